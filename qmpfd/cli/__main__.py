import sys

from qmpfd.cli import main

sys.exit(main())
