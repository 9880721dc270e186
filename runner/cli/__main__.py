"""`python -m runner.cli` (what the console script `snapfleet` runs)."""

import sys

from runner.cli import main

sys.exit(main())
