"""`python -m slimforge` runs the command line."""

import sys

from slimforge.cli import main

sys.exit(main())
