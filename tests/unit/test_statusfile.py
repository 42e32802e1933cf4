"""StatusWriter / StatusReader basics: round trip, seq, typed read errors, scan, symlinks (locks: test_status_lock)."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.status.models import ProcessStatus, State, TrainingStatus, encode_status
from keel.status.reader import StatusReader
from keel.status.results import Corrupt, Missing, Stale, StatusWriteError, TooLarge, UnknownVersion, Unreadable
from keel.status.snapshot import StatusWriter

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def make_status(name: str = "trainer", kind: str = "trainer", **kw) -> ProcessStatus:
    fields = dict(
        name=name, kind=kind, host="h", pid=os.getpid(), pid_start_time=1.0, state=State.RUNNING,
        started_at=T0, heartbeat_wall=T0, heartbeat_mono=time.monotonic(),
        payload={"run_id": "r1", "step": 3} if kind == "trainer" else None,
    )
    fields.update(kw)
    return ProcessStatus(**fields)


def test_write_then_read_round_trips_typed_payload(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    written = w.write(make_status(payload={"run_id": "r1", "step": 3, "loss": float("nan")}))
    got = StatusReader(tmp_path).read("trainer")
    assert isinstance(got, ProcessStatus)
    assert isinstance(got.payload, TrainingStatus)
    assert got.payload.step == 3 and got.payload.loss != got.payload.loss  # NaN survives
    assert got.seq == written.seq == 1
    assert b'"NaN"' in (tmp_path / "trainer.status.json").read_bytes()
    assert oct((tmp_path / "trainer.status.json").stat().st_mode & 0o777) == "0o640"


def test_seq_grows_across_writer_restarts(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    for _ in range(3):
        w.write(make_status())
    w.close()
    w2 = StatusWriter(tmp_path, "trainer")
    assert w2.write(make_status()).seq == 4


def test_update_merges_payload_dict(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    w.write(make_status())
    got = w.update(payload={"loss": 0.5}, state=State.STOPPING)
    assert got.payload.step == 3 and got.payload.loss == 0.5 and got.state is State.STOPPING
    assert StatusReader(tmp_path).read("trainer").payload.loss == 0.5


def test_update_applies_callables_under_the_lock_and_rejects_unknown_fields(tmp_path):
    w = StatusWriter(tmp_path, "custom")
    w.write(make_status("custom", "custom", payload={"count": 1, "keep": "x"}))
    got = w.update(payload=lambda p: {"count": p["count"] + 1})
    assert got.payload == {"count": 2, "keep": "x"}
    with pytest.raises(TypeError, match="stepp"):
        w.update(stepp=3)
    with pytest.raises(TypeError, match="seq"):
        w.update(seq=1)


def test_update_without_snapshot_raises_with_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer.status.json"):
        StatusWriter(tmp_path, "trainer").update(state=State.RUNNING)


@pytest.mark.parametrize("content, kind", [
    (None, Missing),
    (b"", Corrupt),
    (b"{", Corrupt),
    (b"[1, 2]", Corrupt),
    (b'{"schema_version": 1, "name": "trainer"}', Corrupt),
    (b'{"schema_version": 99, "name": "trainer"}', UnknownVersion),
    (b'{"name": "trainer"}', UnknownVersion),
    (b"\xff\xfe\x00", Corrupt),
])
def test_reader_returns_typed_errors(tmp_path, content, kind):
    if content is not None:
        (tmp_path / "trainer.status.json").write_bytes(content)
    got = StatusReader(tmp_path).read("trainer")
    assert type(got) is kind, got
    assert got.path.endswith("trainer.status.json") and got.detail


def test_reader_caps_size_before_parsing(tmp_path):
    (tmp_path / "trainer.status.json").write_bytes(b" " * 2000)
    got = StatusReader(tmp_path, max_bytes=1000).read("trainer")
    assert isinstance(got, TooLarge) and got.size == 2000


def test_reader_does_not_follow_symlink(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_bytes(encode_status(make_status()))
    (tmp_path / "trainer.status.json").symlink_to(secret)
    got = StatusReader(tmp_path).read("trainer")
    assert isinstance(got, Unreadable) and "symlink" in got.detail


def test_stale_by_monotonic_age(tmp_path):
    StatusWriter(tmp_path, "trainer").write(make_status(heartbeat_mono=100.0))
    got = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 115.0, host="h").read("trainer")
    assert isinstance(got, Stale) and got.age == pytest.approx(15.0) and got.status.name == "trainer"
    fresh = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 105.0, host="h").read("trainer")
    assert isinstance(fresh, ProcessStatus)


@pytest.mark.parametrize("jump_h", [1, -1])
def test_stale_ignores_wall_clock_jumps_on_this_host(tmp_path, jump_h):
    StatusWriter(tmp_path, "trainer").write(make_status(heartbeat_mono=100.0))
    jumped = lambda: T0 + timedelta(hours=jump_h)  # noqa: E731
    got = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 105.0, wall=jumped, host="h").read("trainer")
    assert isinstance(got, ProcessStatus)


def test_stale_for_another_host_uses_wall_time(tmp_path):
    StatusWriter(tmp_path, "trainer").write(make_status(heartbeat_mono=1e9))  # another machine's clock
    r = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 5.0, wall=lambda: T0 + timedelta(seconds=30), host="here")
    got = r.read("trainer")
    assert isinstance(got, Stale) and got.age == pytest.approx(30.0)


def test_scan_reads_all_and_sees_changes(tmp_path):
    for n in ("trainer", "trainer.rank1", "dashboard"):
        StatusWriter(tmp_path, n).write(make_status(n, "trainer" if n.startswith("trainer") else "dashboard"))
    r = StatusReader(tmp_path)
    first = r.scan()
    assert set(first) == {"trainer", "trainer.rank1", "dashboard"}
    assert all(isinstance(v, ProcessStatus) for v in first.values())
    StatusWriter(tmp_path, "dashboard").update(state=State.STOPPED)
    assert r.scan()["dashboard"].state is State.STOPPED


# ---------------------------------------------------------------- symlinks, temps, globs


def test_symlink_at_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "trainer.status.json").symlink_to(victim)
    StatusWriter(tmp_path, "trainer").write(make_status())
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "trainer.status.json").is_symlink()
    assert isinstance(StatusReader(tmp_path).read("trainer"), ProcessStatus)


def test_symlink_at_temp_path_is_not_followed(tmp_path, monkeypatch):
    import keel.status.snapshot as sf

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(sf.secrets, "token_hex", lambda n: "deadbeef")
    planted = tmp_path / f".trainer.status.json.tmp.{os.getpid()}.deadbeef"
    planted.symlink_to(victim)
    w = StatusWriter(tmp_path, "trainer")
    with pytest.raises(StatusWriteError) as e:
        w.write(make_status())
    assert e.value.errno == errno.EEXIST and "trainer.status.json" in str(e.value)
    assert victim.read_bytes() == b"precious" and planted.is_symlink()  # not ours: left alone
    assert not (tmp_path / "trainer.status.json").exists()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_writer_start_removes_only_its_dead_temps(tmp_path):
    dead = tmp_path / f".trainer.status.json.tmp.{_dead_pid()}.0000aaaa"
    alive = tmp_path / f".trainer.status.json.tmp.{os.getpid()}.0000bbbb"
    other = tmp_path / f".dashboard.status.json.tmp.{_dead_pid()}.0000cccc"
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    StatusWriter(tmp_path, "trainer")
    assert not dead.exists() and alive.exists() and other.exists()


def test_temp_names_never_match_reader_globs():
    from keel.status.paths import temp_prefix

    tmp = f"{temp_prefix('trainer')}123.abcd0123"
    assert not fnmatch.fnmatch(tmp, "*.status.json") and not fnmatch.fnmatch(tmp, "*.jsonl")
    assert tmp.startswith(".")


def test_scan_ignores_temps_and_reports_bad_files(tmp_path):
    StatusWriter(tmp_path, "trainer").write(make_status())
    (tmp_path / ".trainer.status.json.tmp.1.abcd").write_bytes(b"partial")
    (tmp_path / "broken.status.json").write_bytes(b"{nope")
    (tmp_path / "BAD NAME.status.json").write_bytes(b"{}")
    got = StatusReader(tmp_path).scan()
    assert isinstance(got["trainer"], ProcessStatus)
    assert isinstance(got["broken"], Corrupt)
    assert isinstance(got["BAD NAME"], Unreadable)
    assert len(got) == 3


def test_scan_drops_deleted_files_and_rereads_same_size_rewrite(tmp_path):
    w = StatusWriter(tmp_path, "trainer")
    w.write(make_status(state=State.RUNNING))
    r = StatusReader(tmp_path)
    assert r.scan()["trainer"].state is State.RUNNING
    # Same size, same mtime tick, possibly a reused inode: must still be seen.
    w.write(make_status(state=State.STOPPED))
    assert r.scan()["trainer"].state is State.STOPPED
    (tmp_path / "trainer.status.json").unlink()
    assert r.scan() == {}


def test_scan_reuses_unchanged_entries(tmp_path, monkeypatch):
    StatusWriter(tmp_path, "trainer").write(make_status())
    old = time.time() - 10
    os.utime(tmp_path / "trainer.status.json", (old, old))  # safely past the racy window
    r = StatusReader(tmp_path, stale_after=5.0, mono=lambda: time.monotonic() + 60, host="h")
    first = r.scan()["trainer"]
    assert isinstance(first, Stale)
    loads = []
    real = r._load
    monkeypatch.setattr(r, "_load", lambda n: loads.append(n) or real(n))
    again = r.scan()["trainer"]
    assert loads == [] and isinstance(again, Stale)  # cached, but staleness re-judged


# ---------------------------------------------------------------- odd files


def test_reader_on_directory_fifo_and_empty(tmp_path):
    (tmp_path / "a.status.json").mkdir()
    os.mkfifo(tmp_path / "b.status.json")  # must not block the reader
    (tmp_path / "c.status.json").write_bytes(b"")
    r = StatusReader(tmp_path)
    assert isinstance(r.read("a"), Unreadable)
    assert isinstance(r.read("b"), Unreadable)
    assert isinstance(r.read("c"), Corrupt)
    assert isinstance(r.read("../etc/passwd"), Unreadable)


def test_reader_huge_file_is_not_read_whole(tmp_path):
    with open(tmp_path / "trainer.status.json", "wb") as f:
        f.truncate(64 << 20)  # sparse 64 MiB
    got = StatusReader(tmp_path).read("trainer")
    assert isinstance(got, TooLarge) and got.size == 64 << 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000) | st.builds(
    lambda cut, b: b[:cut], st.integers(min_value=0, max_value=2000),
    st.just(encode_status(make_status()))))
def test_fuzzed_and_truncated_files_give_typed_errors(tmp_path, data):
    (tmp_path / "trainer.status.json").write_bytes(data)
    got = StatusReader(tmp_path).read("trainer")
    if data == encode_status(make_status()):
        assert isinstance(got, ProcessStatus)
    elif isinstance(got, ProcessStatus):  # hypothesis can build a valid snapshot; it must be ours
        assert got.name == "trainer" and encode_status(got)
    else:
        assert isinstance(got, (Corrupt, UnknownVersion)) and got.detail, got


def test_snapshot_for_another_name_is_corrupt(tmp_path):
    (tmp_path / "dashboard.status.json").write_bytes(encode_status(make_status("trainer")))
    got = StatusReader(tmp_path).read("dashboard")
    assert isinstance(got, Corrupt) and "trainer" in got.detail


@pytest.mark.parametrize("field, value", [
    ("pid", "abc"), ("state", "zombie"), ("heartbeat_mono", None), ("name", 5), ("payload", [1]),
    ("started_at", "yesterday"), ("seq", 1.5),
])
def test_wrong_type_fields_are_corrupt(tmp_path, field, value):
    raw = json.loads(encode_status(make_status()))
    raw[field] = value
    (tmp_path / "trainer.status.json").write_text(json.dumps(raw))
    got = StatusReader(tmp_path).read("trainer")
    assert isinstance(got, Corrupt) and field in got.detail


def test_old_version_file_is_unknown_version(tmp_path):
    raw = json.loads(encode_status(make_status()))
    raw["schema_version"] = 0
    (tmp_path / "trainer.status.json").write_text(json.dumps(raw))
    got = StatusReader(tmp_path).read("trainer")
    assert isinstance(got, UnknownVersion) and got.version == 0
