"""Status models: explicit JSON encoding, payload by kind, versioning, ages from the monotonic clock."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.status.models import (
    SCHEMA_VERSION,
    DashboardState,
    ProcessStatus,
    State,
    StatusDecodeError,
    TrainingStatus,
    UnknownVersionError,
    WatchdogStatus,
    check_name,
    decode_status,
    encode_status,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def status(kind: str = "trainer", payload=None, **kw) -> ProcessStatus:
    base = dict(
        name="trainer.rank1", kind=kind, host="h", pid=42, pid_start_time=1.5, state=State.RUNNING,
        started_at=T0, heartbeat_wall=T0, heartbeat_mono=100.0, payload=payload,
    )
    base.update(kw)
    return ProcessStatus(**base)


@pytest.mark.parametrize("value, text", [(float("nan"), '"NaN"'), (float("inf"), '"Infinity"'), (float("-inf"), '"-Infinity"')])
def test_non_finite_floats_are_defined_strings_and_decode_back(value, text):
    s = status(payload={"run_id": "r", "loss": value})
    raw = encode_status(s)
    assert f'"loss":{text}'.encode() in raw
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    back = decode_status(raw).payload.loss
    assert (math.isnan(back) and math.isnan(value)) or back == value


def test_datetimes_are_iso_utc_and_naive_means_utc():
    plus2 = timezone(timedelta(hours=2))
    s = status(started_at=datetime(2026, 11, 28, 14, 0, tzinfo=plus2), heartbeat_wall=datetime(2026, 11, 28, 12, 0))
    raw = json.loads(encode_status(s))
    assert raw["started_at"] == "2026-11-28T12:00:00Z" and raw["heartbeat_wall"] == "2026-11-28T12:00:00Z"
    assert decode_status(encode_status(s)).started_at == T0


@pytest.mark.parametrize("kind, payload, model", [
    ("trainer", {"run_id": "r", "step": 5}, TrainingStatus),
    ("dashboard", {"sessions": 2, "last_refresh": "2026-11-28T12:00:00Z"}, DashboardState),
    ("watchdog", {"processes_watched": ["trainer"], "actions_taken": 1}, WatchdogStatus),
    ("custom", {"anything": [1, 2]}, dict),
])
def test_payload_type_is_chosen_by_kind(kind, payload, model):
    s = decode_status(encode_status(status(kind, payload)))
    assert type(s.payload) is model
    assert s == status(kind, payload)


def test_payload_of_wrong_type_for_kind_is_rejected():
    with pytest.raises(ValueError):
        status("trainer", {"step": "not a number", "run_id": "r"})
    raw = json.loads(encode_status(status("trainer", {"run_id": "r"})))
    raw["payload"]["step"] = [1]
    with pytest.raises(StatusDecodeError, match="payload") as e:
        decode_status(json.dumps(raw).encode(), path="/run/x.status.json")
    assert e.value.path == "/run/x.status.json" and isinstance(e.value, ValueError)


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_unknown_or_missing_schema_version(version):
    raw = json.loads(encode_status(status()))
    if version is None:
        del raw["schema_version"]
    else:
        raw["schema_version"] = version
    with pytest.raises(UnknownVersionError) as e:
        decode_status(json.dumps(raw).encode())
    assert e.value.version == version


def test_a_newer_writer_adding_fields_is_still_readable():
    raw = json.loads(encode_status(status()))
    raw["new_field"] = {"x": 1}
    assert decode_status(json.dumps(raw).encode()).name == "trainer.rank1"


@pytest.mark.parametrize("name", ["trainer", "trainer.rank1", "w_2-x", "a"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Trainer", "1x", ".hidden", "a/b", "../x", "a b", "x" * 200, "tr\u00e4iner"])
def test_invalid_names(name):
    with pytest.raises(ValueError, match="invalid status name"):
        check_name(name)


def test_ages_use_the_monotonic_clock_only():
    s = status(progress_wall=T0, progress_mono=90.0)
    for jump in (timedelta(hours=1), timedelta(hours=-1)):
        jumped = s.model_copy(update={"heartbeat_wall": T0 + jump, "progress_wall": T0 + jump})
        assert jumped.heartbeat_age(105.0) == 5.0 and jumped.progress_age(105.0) == 15.0
    assert status().progress_age(105.0) is None


@settings(max_examples=200, deadline=None)
@given(
    step=st.integers(min_value=0, max_value=2**62),
    loss=st.floats(allow_nan=True, allow_infinity=True) | st.none(),
    err=st.text(max_size=50) | st.none(),
    mono=st.floats(min_value=0, max_value=1e9),
)
def test_round_trip_property(step, loss, err, mono):
    s = status(payload={"run_id": "r", "step": step, "loss": loss}, last_error=err, heartbeat_mono=mono)
    back = decode_status(encode_status(s))
    assert back.payload.step == step and back.last_error == err and back.heartbeat_mono == mono
    assert (loss is None and back.payload.loss is None) or back.payload.loss == loss or (math.isnan(loss) and math.isnan(back.payload.loss))
    assert back.schema_version == SCHEMA_VERSION
