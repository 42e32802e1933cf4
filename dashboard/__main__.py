"""``python -m dashboard --config build/<env>/dashboard.json``."""

import sys

from dashboard.server import main

sys.exit(main())
