"""``python -m service.cli``: the ``unet-tile`` command line."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
