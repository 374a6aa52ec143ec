"""``python -m latticequant``: the command line."""

import sys

from latticequant.cli import main

sys.exit(main())
