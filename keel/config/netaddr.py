"""What counts as a loopback address, for render-config's and the dashboard's bind checks."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost" (any case, a trailing dot: as a Host header may carry it);
    never resolved: a name may resolve to a public interface, and rebinding makes one resolve to 127.0.0.1."""
    if address.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
