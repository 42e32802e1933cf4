"""``python -m keel.watchdog``: the watchdog's stable entry point.

Rendered supervisord programs and systemd units run this module path, so a host whose
config was rendered by an earlier release keeps working; the code lives in ``keel.watch``.
"""
import sys

if __name__ == "__main__":
    from keel.watch.main import main

    sys.exit(main())
