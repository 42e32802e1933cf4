"""A tiny stand-in for a keel process in supervisord tests: sleeps, exits 0 on SIGTERM.

    python tests/integration/standin.py [--exit-after SECONDS]
"""

import argparse
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--config", default=None)
parser.add_argument("--exit-after", type=float, default=None)
args = parser.parse_args()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
deadline = time.monotonic() + args.exit_after if args.exit_after else None
while deadline is None or time.monotonic() < deadline:
    time.sleep(0.1)
