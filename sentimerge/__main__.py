"""`python -m sentimerge <command>`: the same CLI as `sentimerge <command>`."""

import sys

from sentimerge.pipeline.cli import main

sys.exit(main())
