"""``python -m collector``: run a collector process (see :mod:`collector.cli`)."""

import sys

from collector.cli import main

sys.exit(main())
