"""``python -m anomaly_localizer.cli``: the command line (the Slicer module's child process)."""

import sys

from . import main

sys.exit(main())
