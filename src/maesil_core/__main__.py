"""``python -m maesil_core ...`` and ``torchrun ... -m maesil_core ...``: the ``maesil`` command."""

import sys

from .cli.common import install_stop_signals

install_stop_signals()  # before the imports below: a signal while starting is one line

from .cli import main  # noqa: E402

sys.exit(main())
