"""``python -m gptviz.train`` (see :mod:`gptviz.train.cli`)."""

import sys

from .cli import main

sys.exit(main())
