"""JsonlWriter / JsonlTail: one line per write, rotation, truncation, partial lines, events log."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone

from keel.status.jsonl import JsonlWriter, encode_record
from keel.status.jsonl_tail import JsonlTail
from keel.status.paths import EVENTS_FILE


def steps(records):
    return [r["i"] for r in records]


def test_append_and_tail_from_offset(tmp_path):
    log = tmp_path / "trainer.metrics.jsonl"
    w = JsonlWriter(log)
    w.append({"i": 0})
    w.append_many([{"i": 1}, {"i": 2}])
    t = JsonlTail(log)
    assert steps(t.read_new()) == [0, 1, 2]
    assert t.read_new() == []
    w.append({"i": 3})
    assert steps(t.read_new()) == [3]
    resumed = JsonlTail(log, offset=t.offset)  # a restarted reader continues where it was
    w.append({"i": 4})
    assert steps(resumed.read_new()) == [4]


def test_each_record_is_one_line_with_defined_encodings():
    line = encode_record({"loss": float("nan"), "hi": float("inf"), "t": datetime(2026, 1, 1, tzinfo=timezone.utc),
                          "nested": [{"x": float("-inf")}], "s": "line\nbreak"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"loss": "NaN", "hi": "Infinity", "t": "2026-01-01T00:00:00Z",
                                "nested": [{"x": "-Infinity"}], "s": "line\nbreak"}


def test_partial_last_line_is_held_back(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_bytes(b'{"i": 0}\n{"i": ')
    t = JsonlTail(log)
    assert steps(t.read_new()) == [0]
    with open(log, "ab") as f:
        f.write(b'1}\n')
    assert steps(t.read_new()) == [1]


def test_max_records_and_corrupt_lines(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_bytes(b'{"i": 0}\nnot json\n[1]\n\n{"i": 1}\n{"i": 2}\n')
    t = JsonlTail(log)
    assert steps(t.read_new(max_records=2)) == [0, 1]
    assert steps(t.read_new()) == [2]
    assert t.corrupt_lines == 2


def test_rotation_keeps_bounded_backups_and_tail_loses_nothing(tmp_path):
    log = tmp_path / "trainer.metrics.jsonl"
    w = JsonlWriter(log, max_bytes=200, backups=2)
    t = JsonlTail(log)
    got = []
    for i in range(100):
        w.append({"i": i, "pad": "x" * 20})
        if i % 7 == 0:
            got += steps(t.read_new())
    got += steps(t.read_new())
    assert got == list(range(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "trainer.metrics.jsonl", "trainer.metrics.jsonl.1", "trainer.metrics.jsonl.2"]
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())


def test_tail_catches_up_over_several_rotations_between_polls(tmp_path):
    log = tmp_path / "x.jsonl"
    w = JsonlWriter(log, max_bytes=300, backups=5)
    t = JsonlTail(log)
    w.append({"i": 0})
    assert steps(t.read_new()) == [0]
    for i in range(1, 40):  # 30-byte records, 10 a file: 3 rotations, none seen by the tail
        w.append({"i": i, "pad": "y" * 10})
    assert len(list(tmp_path.iterdir())) == 4
    assert steps(t.read_new()) == list(range(1, 40))
    assert t.rotations == 3  # from ours (now .3) to .2, .1, then the live one


def test_tail_whose_file_fell_off_the_rotation_reads_what_is_left_in_order(tmp_path):
    log = tmp_path / "x.jsonl"
    w = JsonlWriter(log, max_bytes=300, backups=1)
    t = JsonlTail(log)
    w.append({"i": 0})
    assert steps(t.read_new()) == [0]
    for i in range(1, 40):  # rotations beyond the one backup: the oldest records are gone
        w.append({"i": i, "pad": "y" * 10})
    got = steps(t.read_new())
    # Our open fd still holds the old file (1..10); the file after it was dropped by the
    # writer; what is left follows in order. Lost records are counted, never repeated.
    assert got == sorted(set(got)) and got[:10] == list(range(1, 11)) and got[-1] == 39
    assert 11 not in got and t.gaps == 1


def test_truncation_in_place_starts_over(tmp_path):
    log = tmp_path / "x.jsonl"
    w = JsonlWriter(log)
    w.append_many([{"i": i} for i in range(5)])
    t = JsonlTail(log)
    assert steps(t.read_new()) == list(range(5))
    os.truncate(log, 0)
    w.close()
    w.append({"i": 100})
    assert steps(t.read_new()) == [100]


def test_missing_file_then_created(tmp_path):
    log = tmp_path / EVENTS_FILE
    t = JsonlTail(log)
    assert t.read_new() == []
    JsonlWriter(log).append({"event": "restart", "process": "trainer"})
    assert t.read_new() == [{"event": "restart", "process": "trainer"}]


def test_threads_share_a_writer_without_interleaving(tmp_path):
    log = tmp_path / "x.jsonl"
    w = JsonlWriter(log, max_bytes=4000, backups=50)

    def put(k):
        for i in range(200):
            w.append({"k": k, "i": i, "pad": "z" * 30})

    ts = [threading.Thread(target=put, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    files = sorted(tmp_path.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    records = [json.loads(line) for p in files for line in p.read_bytes().splitlines()]
    assert len(records) == 800
    for k in range(4):
        assert [r["i"] for r in records if r["k"] == k] == list(range(200))
