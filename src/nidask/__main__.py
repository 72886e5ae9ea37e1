"""``python -m nidask``: the command line (see :mod:`nidask.cli`)."""

import sys

from nidask.cli import main

if __name__ == "__main__":
    sys.exit(main())
