"""``python -m qmpfd``: the daemon, as the ``qmpfd`` command."""

import sys

from qmpfd.daemon import main

sys.exit(main())
