"""dashboard.config and dashboard.auth: parsing the resolved file, bind rules, password hashes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from dashboard.auth import BadHash, PasswordAuth, hash_password, load_hash, parse_hash, verify_password
from dashboard.config import AuthConfig, ConfigError, check_bind, is_loopback, load_config, parse_config
from dashboard.server import websocket_origins
from tests.resolved import resolve_stack
from tests.support import PYTHON, REPO_ROOT


def resolved(tmp_path: Path, **dashboard) -> Path:
    """dashboard.json (and keel.json) for a dev-like stack, written by the real resolver."""
    resolve_stack(tmp_path, {"dashboard": {"kind": "dashboard", **dashboard},
                             "trainer": {"kind": "trainer", "launcher": "torchrun", "torchrun": {"nproc_per_node": 2},
                                         "health": {"heartbeat_timeout": "9s"}, "limits": {"memory": "2GiB"}}})
    return tmp_path / "dashboard.json"


def test_values_come_from_the_resolved_file(tmp_path):
    cfg = load_config(resolved(tmp_path))
    assert (cfg.address, cfg.port, cfg.refresh, cfg.history_points, cfg.auth.required) == \
        ("127.0.0.1", 5006, 1.0, 2000, False)
    assert cfg.allow_websocket_origin == ("127.0.0.1:5006", "localhost:5006")
    assert cfg.read_timeout == 2.0 and cfg.stack == str(tmp_path / "keel.json")
    assert load_config(resolved(tmp_path, allow_origins=["a:1"])).allow_websocket_origin == ("a:1",)


def test_the_one_origin_key_spelling(tmp_path):
    doc = json.loads(resolved(tmp_path).read_text())
    doc["dashboard"]["allow_origins"] = doc["dashboard"].pop("allow_websocket_origin")
    with pytest.raises(ConfigError, match="d.json: dashboard.allow_websocket_origin: missing"):
        parse_config(doc, where="d.json")


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["dashboard"].update(port="80"), "d.json: dashboard.port: Input should be a valid integer"),
    (lambda d: d["dashboard"].update(allow_websocket_origin="x:1"), "d.json: dashboard.allow_websocket_origin"),
    (lambda d: d["dashboard"]["auth"].pop("username"), "d.json: dashboard.auth.username: missing"),
    (lambda d: d.pop("paths"), "d.json: paths: missing"),
    (lambda d: d.update(format_version=99), "d.json: format_version: unknown format_version 99"),
])
def test_a_file_off_the_contract_names_file_and_key(tmp_path, edit, where):
    doc = json.loads(resolved(tmp_path).read_text())
    edit(doc)
    with pytest.raises(ConfigError) as info:
        parse_config(doc, where="d.json")
    assert str(info.value).startswith(where)


def test_load_config_reads_the_stack_and_tolerates_its_absence(tmp_path):
    p = resolved(tmp_path)
    cfg = load_config(p)
    by_name = {proc.name: proc for proc in cfg.processes}
    assert by_name["trainer"].status_names == ("trainer.rank0", "trainer.rank1")
    assert by_name["trainer"].heartbeat_timeout == 9.0
    assert by_name["trainer"].entry.limits.memory_bytes == 2 << 30  # the typed entry, whole: the page judges limits
    (tmp_path / "keel.json").unlink()
    assert load_config(p).processes == ()
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(p)


def test_a_stale_stack_file_is_an_error_naming_it(tmp_path):
    p = resolved(tmp_path)
    stack = json.loads((tmp_path / "keel.json").read_text())
    del stack["processes"]["trainer"]["status_names"]
    (tmp_path / "keel.json").write_text(json.dumps(stack))
    with pytest.raises(ConfigError, match=r"keel.json: processes.trainer.status_names: missing"):
        load_config(p)


@pytest.mark.parametrize("addr, loop", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                        ("localhost", True), ("0.0.0.0", False), ("", False),
                                        ("10.0.0.5", False), ("dash.example.com", False)])
def test_loopback(addr, loop):
    assert is_loopback(addr) is loop


def test_non_loopback_needs_an_origin_list(tmp_path):
    cfg = load_config(resolved(tmp_path))
    with pytest.raises(ConfigError, match="non-loopback"):
        check_bind(replace(cfg, address="0.0.0.0", allow_websocket_origin=()))
    check_bind(replace(cfg, address="0.0.0.0", allow_websocket_origin=("dash.example:5006",)))
    assert websocket_origins(cfg) == ["127.0.0.1:5006", "localhost:5006"]
    assert websocket_origins(replace(cfg, address="0.0.0.0", allow_websocket_origin=("d:1",))) == ["d:1"]


def test_hash_roundtrip_and_format():
    h = hash_password("correct horse")
    assert h.startswith("scrypt$16384$8$1$") and len(h.split("$")) == 6
    assert verify_password("correct horse", h)
    assert not verify_password("correct hors", h)
    assert hash_password("x") != hash_password("x")  # salted
    with pytest.raises(ValueError):
        hash_password("")


@pytest.mark.parametrize("bad", ["", "plaintext", "scrypt$16384$8$1$c2FsdA==", "bcrypt$1$2$3$a$b",
                                 "scrypt$1000$8$1$c2FsdHNhbHQ=$a2V5a2V5a2V5a2V5a2V5a2V5",
                                 "scrypt$16384$8$1$!!!$a2V5"])
def test_bad_hashes_are_refused(bad):
    with pytest.raises(BadHash):
        parse_hash(bad)


def auth(password_hash: str | None = None, password_file: str | None = None) -> AuthConfig:
    return AuthConfig(required=True, username="keel", password_hash=password_hash, password_file=password_file)


def test_load_hash_from_config_or_file(tmp_path):
    h = hash_password("pw")
    assert load_hash(auth(password_hash=h)) == h
    f = tmp_path / "pw"
    f.write_text(h + "\n")
    assert load_hash(auth(password_file=str(f))) == h
    with pytest.raises(ConfigError, match="password_file"):
        load_hash(auth(password_file=str(tmp_path / "nope")))
    f.write_text("hunter2\n")  # a plaintext password in the file is refused, not used
    with pytest.raises(ConfigError, match="scrypt"):
        load_hash(auth(password_file=str(f)))
    with pytest.raises(ConfigError, match="no default password"):
        load_hash(auth())
    with pytest.raises(BadHash):
        PasswordAuth("keel", "nope")


def test_hash_helper_command():
    out = subprocess.run([PYTHON, "-m", "dashboard.auth", "hash"], input="s3cret\n", capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert verify_password("s3cret", out.stdout.strip())
    empty = subprocess.run([PYTHON, "-m", "dashboard.auth", "hash"], input="\n", capture_output=True,
                           text=True, cwd=REPO_ROOT, timeout=60)
    assert empty.returncode == 1 and "empty" in empty.stderr
