"""`python -m torchrefit.cli`: the torchrefit command."""

import sys

from . import main

sys.exit(main())
