"""`python -m ktutorial`: the ktutorial command, where no console script is installed (a GPU host
with the package on PYTHONPATH)."""

import sys

from ktutorial.cli import main

sys.exit(main())
