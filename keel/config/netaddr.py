"""What counts as a loopback address, for render-config's and the dashboard's bind checks."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; a host name may resolve to a public interface, so no."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
