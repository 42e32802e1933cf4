"""dashboard.config and dashboard.auth: parsing the resolved file, bind rules, password hashes."""

from __future__ import annotations

import json
import subprocess

import pytest

from dashboard.auth import BadHash, PasswordAuth, hash_password, load_hash, parse_hash, verify_password
from dashboard.config import AuthConfig, ConfigError, check_bind, is_loopback, load_config, parse_config
from dashboard.server import websocket_origins
from tests.support import PYTHON, REPO_ROOT


def raw(**dash) -> dict:
    return {"project": "keel", "environment": "dev", "name": "dashboard",
            "paths": {"run_dir": "/r", "log_dir": "/l"}, "dashboard": {"port": 5006, **dash}}


def test_defaults_and_both_origin_key_spellings():
    cfg = parse_config(raw())
    assert (cfg.address, cfg.port, cfg.refresh, cfg.history_points, cfg.auth.required) == \
        ("127.0.0.1", 5006, 1.0, 2000, False)
    assert parse_config(raw(allow_websocket_origin=["a:1"])).allow_websocket_origin == ("a:1",)
    assert parse_config(raw(allow_origins=["b:2"])).allow_websocket_origin == ("b:2",)
    assert cfg.read_timeout == 2.0


@pytest.mark.parametrize("bad, where", [
    (dict(refresh=0), "refresh"),
    (dict(port="80"), "port"),
    (dict(history_points=3), "history_points"),
    (dict(allow_websocket_origin="x:1"), "allow_websocket_origin"),
    (dict(auth={"required": True}), "no default password"),
])
def test_bad_values_name_the_key(bad, where):
    with pytest.raises(ConfigError, match=where):
        parse_config(raw(**bad))


def test_missing_paths_is_an_error():
    with pytest.raises(ConfigError, match="paths"):
        parse_config({"dashboard": {}})


def test_load_config_reads_the_stack_and_tolerates_its_absence(tmp_path):
    stack = {"processes": {"trainer": {"kind": "trainer", "status_names": ["trainer.rank0", "trainer.rank1"],
                                       "log_file": "/l/trainer.log", "health": {"heartbeat_timeout": 9.0}}}}
    (tmp_path / "keel.json").write_text(json.dumps(stack))
    p = tmp_path / "dashboard.json"
    p.write_text(json.dumps(raw(stack=str(tmp_path / "keel.json"))))
    cfg = load_config(p)
    assert cfg.processes[0].status_names == ("trainer.rank0", "trainer.rank1")
    assert cfg.processes[0].heartbeat_timeout == 9.0
    (tmp_path / "keel.json").unlink()
    assert load_config(p).processes == ()
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(p)


@pytest.mark.parametrize("addr, loop", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                        ("localhost", True), ("0.0.0.0", False), ("", False),
                                        ("10.0.0.5", False), ("dash.example.com", False)])
def test_loopback(addr, loop):
    assert is_loopback(addr) is loop


def test_non_loopback_needs_an_origin_list():
    with pytest.raises(ConfigError, match="non-loopback"):
        check_bind(parse_config(raw(address="0.0.0.0")))
    check_bind(parse_config(raw(address="0.0.0.0", allow_websocket_origin=["dash.example:5006"])))
    assert websocket_origins(parse_config(raw())) == ["127.0.0.1:5006", "localhost:5006"]
    assert websocket_origins(parse_config(raw(address="0.0.0.0", allow_websocket_origin=["d:1"]))) == ["d:1"]


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


def test_load_hash_from_config_or_file(tmp_path):
    h = hash_password("pw")
    assert load_hash(AuthConfig(required=True, password_hash=h)) == h
    f = tmp_path / "pw"
    f.write_text(h + "\n")
    assert load_hash(AuthConfig(required=True, password_file=str(f))) == h
    with pytest.raises(ConfigError, match="password_file"):
        load_hash(AuthConfig(required=True, password_file=str(tmp_path / "nope")))
    f.write_text("hunter2\n")  # a plaintext password in the file is refused, not used
    with pytest.raises(ConfigError, match="scrypt"):
        load_hash(AuthConfig(required=True, password_file=str(f)))
    with pytest.raises(ConfigError, match="no default password"):
        load_hash(AuthConfig(required=True))
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
