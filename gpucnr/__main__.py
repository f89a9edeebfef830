"""`python -m gpucnr` = the `gpucnr` command."""

import sys

from gpucnr.cli import main

sys.exit(main())
