"""``python -m vol3d``: the ``vol3d`` command."""

import sys

from vol3d.cli import main

sys.exit(main())
