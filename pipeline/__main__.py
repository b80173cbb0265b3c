import sys

from sentimerge.pipeline.cli import entry

sys.exit(entry())
