"""Run the command line with `python -m lazycluster.cli`."""

import sys

from lazycluster.cli import main

sys.exit(main())
