"""`python -m polytrain` runs the command line."""

import sys

from polytrain.cli import main

sys.exit(main())
