"""``python -m smolcandle``: the same as the ``smolcandle`` command."""

import sys

from .cli import main

sys.exit(main())
