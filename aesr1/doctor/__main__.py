"""``python -m aesr1.doctor``: the same as ``aesr1 doctor``."""

import sys

from aesr1.doctor.cli import main

sys.exit(main())
