"""``python -m maesil_core ...`` and ``torchrun ... -m maesil_core ...``: the ``maesil`` command."""

import sys

from .cli import main

sys.exit(main())
