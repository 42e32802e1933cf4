"""StatusWriter / StatusReader basics: round trip, seq, typed read errors, scan, symlinks, locks."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

import pytest

from keel.models import ProcessStatus, State, TrainingStatus, encode_status
from keel.statusfile import (
    Corrupt,
    Missing,
    Stale,
    StatusReader,
    StatusWriter,
    TooLarge,
    UnknownVersion,
    Unreadable,
)

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
    got = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 115.0).read("trainer")
    assert isinstance(got, Stale) and got.age == pytest.approx(15.0) and got.status.name == "trainer"
    fresh = StatusReader(tmp_path, stale_after=10.0, mono=lambda: 105.0).read("trainer")
    assert isinstance(fresh, ProcessStatus)


def test_scan_reads_all_and_sees_changes(tmp_path):
    for n in ("trainer", "trainer.rank1", "dashboard"):
        StatusWriter(tmp_path, n).write(make_status(n, "trainer" if n.startswith("trainer") else "dashboard"))
    r = StatusReader(tmp_path)
    first = r.scan()
    assert set(first) == {"trainer", "trainer.rank1", "dashboard"}
    assert all(isinstance(v, ProcessStatus) for v in first.values())
    StatusWriter(tmp_path, "dashboard").update(state=State.STOPPED)
    assert r.scan()["dashboard"].state is State.STOPPED
