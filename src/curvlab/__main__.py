"""``python -m curvlab`` runs the command line."""

import sys

from curvlab.cli import main

sys.exit(main())
