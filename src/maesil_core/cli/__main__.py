"""``python -m maesil_core.cli`` (the same as ``python -m maesil_core``)."""

import sys

from . import main

sys.exit(main())
