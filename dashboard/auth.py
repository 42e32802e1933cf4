"""Password login for the dashboard: hashing, checking, and a Bokeh AuthProvider.

Hash format (one line, see docs/dashboard.md)::

    scrypt$16384$8$1$<salt, base64>$<key, base64>

made by ``python -m dashboard.auth hash`` (reads the password from a prompt or
stdin). There is no default password: ``auth.required`` without a hash is a
configuration error. A successful login sets a signed, HttpOnly,
SameSite=Strict cookie; the cookie key is random per server process, so a
restart logs everyone out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from typing import Any

from bokeh.server.auth_provider import AuthProvider
from tornado.web import RequestHandler

from dashboard.config import AuthConfig, ConfigError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
COOKIE = "keel_dashboard_user"
LOGIN_URL = "/login"
LOGOUT_URL = "/logout"


class BadHash(ValueError):
    """A password hash that is not in the documented format."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash ``password`` with scrypt and a random 16-byte salt."""
    if not password:
        raise ValueError("empty password")
    salt = salt or secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(key)}"


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """Split a stored hash into (n, r, p, salt, key); raises BadHash."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise BadHash("expected scrypt$N$r$p$salt$key (make one with `python -m dashboard.auth hash`)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as exc:
        raise BadHash(f"malformed hash: {exc}") from None
    if n < 2**10 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(salt) < 8 or len(key) < 16:
        raise BadHash("hash parameters out of range")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (constant-time compare)."""
    n, r, p, salt, key = parse_hash(stored)
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=256 << 20)
    return hmac.compare_digest(got, key)


def load_hash(auth: AuthConfig) -> str:
    """The configured hash, from the config or its file; checked, so a typo fails at start."""
    stored = auth.password_hash
    if stored is None and auth.password_file:
        try:
            with open(auth.password_file, encoding="utf-8") as f:
                stored = f.readline().strip()
        except OSError as exc:
            raise ConfigError(f"dashboard.auth.password_file {auth.password_file}: {exc.strerror or exc}") from None
    if not stored:
        raise ConfigError("dashboard.auth: required needs password_hash or password_file (no default password)")
    try:
        parse_hash(stored)
    except BadHash as exc:
        raise ConfigError(f"dashboard.auth: {exc}") from None
    return stored


_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>keel dashboard login</title></head>
<body style="font-family:sans-serif;max-width:22em;margin:4em auto">
<h2>keel dashboard</h2>{error}
<form method="post" action="{action}">
<p><label>user <input name="username" autocomplete="username" autofocus></label></p>
<p><label>password <input name="password" type="password" autocomplete="current-password"></label></p>
<p><button type="submit">log in</button></p></form></body></html>"""


class PasswordAuth(AuthProvider):
    """Bokeh auth provider: one user, one scrypt hash, a signed cookie."""

    def __init__(self, username: str, password_hash: str) -> None:
        self.username = username
        self.password_hash = password_hash
        parse_hash(password_hash)
        super().__init__()

    @property
    def get_user(self) -> Any:
        def get_user(handler: RequestHandler) -> str | None:
            value = handler.get_signed_cookie(COOKIE, max_age_days=1)
            return value.decode() if value else None

        return get_user

    @property
    def login_url(self) -> str:
        return LOGIN_URL

    @property
    def login_handler(self) -> type[RequestHandler]:
        provider = self

        class LoginHandler(RequestHandler):
            def get(self) -> None:
                self.write(_FORM.format(error="", action=LOGIN_URL))

            async def post(self) -> None:
                user = self.get_argument("username", "")
                password = self.get_argument("password", "")
                ok = hmac.compare_digest(user.encode(), provider.username.encode()) and verify_password(
                    password, provider.password_hash
                )
                if not ok:
                    await asyncio.sleep(0.5)  # blunt online guessing a little; scrypt does the rest
                    self.set_status(401)
                    self.write(_FORM.format(error="<p style='color:#c62828'>wrong user or password</p>",
                                            action=LOGIN_URL))
                    return
                self.set_signed_cookie(COOKIE, user, expires_days=1, httponly=True, samesite="Strict")
                self.redirect(self.get_argument("next", "/") if _local(self.get_argument("next", "/")) else "/")

        return LoginHandler

    @property
    def logout_url(self) -> str:
        return LOGOUT_URL

    @property
    def logout_handler(self) -> type[RequestHandler]:
        class LogoutHandler(RequestHandler):
            def get(self) -> None:
                self.clear_cookie(COOKIE)
                self.redirect(LOGIN_URL)

        return LogoutHandler


def _local(url: str) -> bool:
    """Only same-site paths are followed after login (no open redirect)."""
    return url.startswith("/") and not url.startswith("//") and "\\" not in url


def main(argv: list[str] | None = None) -> int:
    """``python -m dashboard.auth hash``: print a hash for the password typed (or piped on stdin)."""
    ap = argparse.ArgumentParser(prog="python -m dashboard.auth")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash", help="read a password and print its hash for dashboard.auth.password_hash")
    ap.parse_args(argv)
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if not pw:
        print("empty password refused", file=sys.stderr)
        return 1
    print(hash_password(pw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
