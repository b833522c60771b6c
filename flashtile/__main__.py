"""``python -m flashtile <command>``: see :mod:`flashtile.cli`."""

import sys

from .cli import main

sys.exit(main())
