"""``python -m codesign.cli``."""

from __future__ import annotations

import sys

from codesign.cli.app import main

sys.exit(main())
