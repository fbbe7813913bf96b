"""``python -m xpuc.compiler.cli``."""

import sys

from xpuc.compiler.cli import main

sys.exit(main())
