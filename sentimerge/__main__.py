"""`python -m sentimerge <command>`: the same CLI as `sentimerge <command>`."""

import sys

from sentimerge.pipeline.cli import entry

sys.exit(entry())
