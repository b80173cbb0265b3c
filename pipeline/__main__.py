import sys

from sentimerge.pipeline.cli import main

sys.exit(main())
