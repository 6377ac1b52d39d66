"""``python -m xstars`` runs the ``xstars`` command line."""

import sys

from xstars.cli import main

sys.exit(main())
