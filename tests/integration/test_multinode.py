"""Two nodes of one torchrun job on this machine: two environments, each with its own run dir under
its own supervisord (bin/launch), `nproc_per_node: 1` each, c10d rendezvous on 127.0.0.1, one
shared checkpoint dir. Real faults: a SIGKILLed rank, a node's stack stopped.

The tests share one job, in order; the last takes it down and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import psutil
import pytest

from keel.status.models import State
from keel.status.reader import StatusReader
from tests.support import keel_config_pids, PYTHON, REPO_ROOT, free_port, is_alive, wait_until

pytestmark = pytest.mark.slow

ENV = "mn"  # the same environment name on both nodes: the default rendezvous id is <project>-<env>-<release>
JOIN_TIMEOUT = 15.0


class Node:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.cfg = root / "configs"
        self.env = {**os.environ, "KEEL_BUILD_ROOT": str(root / "build")}
        self.run_dir = root / "var" / "run"
        self.rank_name = f"trainer.{name}.r0"

    def launch(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(REPO_ROOT / "bin" / "launch"), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)

    def bin_status(self) -> dict:
        done = subprocess.run([str(REPO_ROOT / "bin" / "status"), ENV, "--json"], capture_output=True, text=True, timeout=30, env=self.env)
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    def rank(self):
        """The rank's status snapshot (a falsy ReadError until there is one)."""
        return StatusReader(self.run_dir).read(self.rank_name)

    def payload(self) -> dict:
        st = self.rank()
        if not st or st.payload is None:
            return {}
        p = st.payload
        return p if isinstance(p, dict) else p.model_dump()

    def supervisord_pid(self) -> int | None:
        try:
            return int((self.run_dir / "supervisord.pid").read_text())
        except (OSError, ValueError):
            return None

    def pids(self) -> set[int]:
        """Every live, non-zombie process carrying this node's KEEL_CONFIG (the agent, its rank)."""
        return keel_config_pids(self.root / "build" / ENV)

    def rank_pid(self) -> int | None:
        st = self.rank()
        return st.pid if st and st.state == State.RUNNING and is_alive(st.pid) else None


def write_configs(node: Node, port: int, shared: Path) -> None:
    node.cfg.mkdir(parents=True)
    # A base of our own: the job needs no dashboard, and two fewer Bokeh servers keep the test light.
    (node.cfg / "base.yaml").write_text(textwrap.dedent(f"""\
        project: keel
        paths:
          root: {node.root}
          checkpoint_dir: {shared}
        processes:
          trainer:
            kind: trainer
            launcher: torchrun
            torchrun:
              nproc_per_node: 1
              nnodes: 2
              backend: gloo
              rdzv_endpoint: 127.0.0.1:{port}
              node: {node.name}
              shared_checkpoints: true
              max_restarts: 20
              join_timeout: {JOIN_TIMEOUT}s
              last_call_timeout: 1s
              close_timeout: 5s
            num_workers: 0
            val_every_steps: 1000000
            checkpoint:
              every_seconds: 1s
            report:
              status_interval: 200ms
              metrics_interval: 500ms
            health:
              heartbeat_interval: 500ms
              heartbeat_timeout: 30s
              progress_timeout: 2m
              startup_grace: 2m
            restart:
              policy: on-failure
              backoff_initial: 1s
              backoff_max: 2s
              max_restarts: 20
              window: 10m
            stop:
              timeout: 15s
            startsecs: 1s
          watchdog:
            kind: watchdog
            poll_interval: 1s
            health:
              heartbeat_interval: 500ms
              heartbeat_timeout: 10s
              startup_grace: 30s
        """))
    (node.cfg / f"{ENV}.yaml").write_text("{}\n")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    shared = base / "shared-checkpoints"
    port = free_port()
    nodes = [Node(base / name, name) for name in ("a", "b")]
    for node in nodes:
        write_configs(node, port, shared)
    for node in nodes:
        done = node.launch("up", ENV, "--config-dir", str(node.cfg), "--no-wait")
        assert done.returncode == 0, done.stdout + done.stderr
    yield nodes
    for node in nodes:
        node.launch("down", ENV, timeout=120)
    for node in nodes:
        for pid in node.pids() | ({node.supervisord_pid()} - {None}):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    wait_until(lambda: not any(n.pids() for n in nodes), 15, what="no job process left")


def training(nodes, *, past: int = 0, world: int = 2):
    """Both ranks running in one world of `world`, each past step `past`."""
    states = [(n.rank(), n.payload()) for n in nodes]
    return all(st and st.state == State.RUNNING and p.get("world_size") == world and p.get("step", 0) > past for st, p in states)


def test_two_nodes_train_as_one_job(job):
    wait_until(lambda: training(job, past=5), 90, what="both nodes training in a world of 2")
    ranks = sorted(n.payload()["rank"] for n in job)
    assert ranks == [0, 1]  # one global rank per node, whichever node got which
    for node in job:
        stack = json.loads((node.root / "build" / ENV / "keel.json").read_text())
        assert stack["processes"]["trainer"]["status_names"] == [node.rank_name]  # what the local watchdog watches
        cmd = stack["processes"]["trainer"]["command"]
        assert "--rdzv-endpoint" in cmd and "--standalone" not in cmd
        trainer = next(p for p in node.bin_status()["processes"] if p["name"] == "trainer")
        assert [(r["name"], r["world_size"]) for r in trainer["ranks"]] == [(node.rank_name, 2)], trainer  # ranks per node


def test_a_sigkilled_rank_brings_both_nodes_back_from_the_checkpoint(job):
    # only global rank 0 saves (into the shared dir), so one node's payload names the checkpoint
    wait_until(lambda: training(job) and any(n.payload().get("checkpoint_step") for n in job), 120, what="a checkpoint written")
    victim, other = job
    before = {n.name: (n.rank().pid, n.payload()["step"]) for n in job}
    ckpt = max(n.payload().get("checkpoint_step") or 0 for n in job)
    os.kill(before[victim.name][0], signal.SIGKILL)

    def both_back() -> bool:
        return training(job) and all(n.rank().pid != before[n.name][0] for n in job)

    # torchrun restarts the dead rank's node and the other node's rank at a new rendezvous
    wait_until(both_back, 180, what="both nodes re-rendezvoused with new ranks")
    for node in job:
        step = node.payload()["step"]
        assert step >= ckpt > 0, (node.name, step, ckpt)  # resumed from the checkpoint, not from 0
    # the other node's rank really loaded the checkpoint (its "resume" log event), not just ran on past it
    resumes = [r for r in map(_json_or_none, (other.root / "var" / "log" / "trainer.log").read_text().splitlines())
               if r and r.get("event") == "resume"]
    assert resumes and resumes[-1]["step"] >= ckpt, resumes


def _json_or_none(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def test_a_stopped_node_leaves_the_other_honestly_failed_or_waiting(job):
    wait_until(lambda: training(job), 90, what="both nodes training")
    a, b = job
    gone = b.pids()
    done = b.launch("down", ENV, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: not (gone & b.pids()), 20, what="node b's processes gone")

    def a_reports() -> bool:
        st = a.rank()
        return bool(st) and st.state in (State.FAILED, State.STARTING, State.STOPPED)

    # the peer's loss surfaces at the next collective; then the agent waits for the rendezvous
    wait_until(a_reports, JOIN_TIMEOUT + 30, what="node a's rank reports the job as failed or waiting")
    st = a.rank()
    assert st.state != State.RUNNING
    if st.state == State.FAILED:
        assert st.last_error  # says why


def test_the_whole_job_stops_with_nothing_left_behind(job):
    a, _ = job
    sup = a.supervisord_pid()
    done = a.launch("down", ENV, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: not any(n.pids() for n in job), 20, what="no process of either node left")
    assert sup is None or not is_alive(sup)


CHECK = """\
import sys
from pathlib import Path

import torch.distributed as dist

from trainer.multinode import check_shared_checkpoints

dist.init_process_group("gloo")
rank = dist.get_rank()
where = Path(sys.argv[1] if rank == 0 or sys.argv[3] == "shared" else sys.argv[2])
# Each rank writes its own answer file: two ranks printing to one inherited pipe can interleave.
answer = Path(sys.argv[4]) / f"rank{rank}.txt"
try:
    check_shared_checkpoints(where, rank, f"n{rank}", "job-1")
    answer.write_text(f"rank {rank}: OK")
except RuntimeError as e:
    answer.write_text(f"rank {rank}: ERROR {e}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("layout", ["shared", "apart"])
def test_the_start_check_tells_a_shared_checkpoint_dir_from_separate_ones(tmp_path, layout):
    """Two real gloo ranks: with one dir both pass; with a dir each, every rank fails with the same clear error."""
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    dirs = [tmp_path / "ckpt-a", tmp_path / "ckpt-b"]
    argv = [str(Path(PYTHON).parent / "torchrun"), "--nproc-per-node", "2", "--standalone", str(script), *map(str, dirs), layout, str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if layout == "shared":
        assert lines == ["rank 0: OK", "rank 1: OK"]
    else:
        assert len(lines) == 2 and all("ERROR checkpoint_dir" in line for line in lines), lines
        assert all("rank 1 on node n1 does not see rank 0's .keel-shared-checkpoints" in line for line in lines)
        assert (dirs[0] / ".keel-shared-checkpoints").read_text().startswith("job-1 ")
