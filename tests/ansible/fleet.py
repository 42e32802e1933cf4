"""A simulated fleet for the Ansible tests: three "hosts" that are all this machine
(`ansible_connection: local`), each with its own prefix, dashboard port and supervisord socket,
running real standalone supervisord stacks of the real trainer, dashboard and watchdog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from tests.support import REPO_ROOT, free_port, is_alive, kill_tree, wait_until

ANSIBLE_DIR = REPO_ROOT / "ansible"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
ENV = "dev"

# What a release is packed from in the tests: a frozen copy of the working tree, so that other
# people editing the checkout while the tests run cannot change a release's content.
SNAPSHOT_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "__pycache__", ".pytest_cache", ".hypothesis", ".ansible", "supervisord.conf", "tmp*")


def snapshot(dest: Path) -> Path:
    shutil.copytree(REPO_ROOT, dest, symlinks=True, ignore=SNAPSHOT_IGNORE)
    return dest


def ansible_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "KEEL_"))}
    env.update({
        "ANSIBLE_PIPELINING": "1",          # fewer temp files per task: matters on a busy 2-core box
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
    })
    return env


@dataclass
class Host:
    name: str
    prefix: Path
    port: int
    socket: Path

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    def version(self) -> str:
        return os.readlink(self.current).rsplit("/", 1)[-1]

    def status(self) -> dict | None:
        """`bin/status dev --json` of the current release (None when it cannot answer)."""
        # cwd: the release (bin/* run `python -m`, which puts the cwd first on sys.path)
        done = subprocess.run([str(self.current / "bin" / "status"), ENV, "--json"], capture_output=True, text=True,
                              timeout=60, env=ansible_env(), cwd=self.current)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None

    def healthy(self) -> bool:
        status = self.status()
        return bool(status and status["healthy"])

    def pids(self) -> dict[str, int]:
        status = self.status() or {"processes": []}
        return {p["name"]: p["pid"] for p in status["processes"]}


@dataclass
class Fleet:
    root: Path
    source: Path
    hosts: list[Host]
    group_vars: dict = field(default_factory=dict)  # added to (or replacing) the defaults below
    # multi-node jobs: {"<name>": {"hosts": ["node1", ...], "vars": {...}}} -> groups keel_job_<name> under keel_jobs
    jobs: dict = field(default_factory=dict)
    inventory: Path = field(init=False)

    def __post_init__(self) -> None:
        self.inventory = self.root / "inventory"
        self.write_inventory()

    def write_inventory(self) -> None:
        """hosts.yml plus group_vars/all/rollout.yml (serial 1, max_fail_percentage 0: like prod)."""
        (self.inventory / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
        hosts = {
            h.name: {"keel_prefix": str(h.prefix), "keel_dashboard_port": h.port, "keel_supervisord_socket": str(h.socket)}
            for h in self.hosts
        }
        group_vars = {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "ansible_become": False,
            "keel_env": ENV,
            "keel_user": "root",
            "keel_group": "root",
            "keel_host_manage_user": False,
            "keel_host_packages": [],
            "keel_source_dir": str(self.source),
            "keel_controller_build_dir": str(self.root / "controller"),
            # the air-gapped/CI path: every release links the repo's own .venv instead of building one
            "keel_release_venv_source": str(REPO_ROOT / ".venv"),
            "keel_health_timeout": 240,
            "keel_health_revert_timeout": 240,
            "keel_health_delay": 2,
            # light stacks: three real trainers share two cores (often with other work), and a torch import
            # can take longer than dev's 20 s progress timeout: generous health timeouts, so that the
            # watchdog does not restart a slow-starting trainer in the middle of a test
            "keel_config_overrides": {
                "processes.trainer.num_workers": 0,
                "processes.trainer.threads": 1,
                "processes.trainer.batch_size": 16,
                "processes.watchdog.poll_interval": "2s",
                **{f"processes.{name}.health.{key}": value
                   for name in ("trainer", "dashboard", "watchdog")
                   for key, value in (("heartbeat_timeout", "90s"), ("progress_timeout", "5m"), ("startup_grace", "5m"))},
            },
        }
        group_vars.update(self.group_vars)
        keel = {"hosts": hosts, "vars": group_vars}
        if self.jobs:
            keel["children"] = {"keel_jobs": {"children": {
                f"keel_job_{name}": {"hosts": {h: {} for h in job["hosts"]}, "vars": {"keel_job_name": name, **job.get("vars", {})}}
                for name, job in self.jobs.items()}}}
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump({"keel": keel}))
        (self.inventory / "group_vars" / "all" / "rollout.yml").write_text(
            yaml.safe_dump({"keel_serial": 1, "keel_max_fail_percentage": 0}))

    def playbook(self, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), str(ANSIBLE_DIR / name), *args]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ansible_env(), cwd=self.root)
        print(f"$ {' '.join(argv)}  ({time.monotonic() - started:.0f}s, rc {done.returncode})\n{done.stdout[-6000:]}{done.stderr[-3000:]}")
        return done

    def down(self) -> None:
        """bin/launch down on every host, then SIGKILL whatever of a host's stack is left (found by
        KEEL_CONFIG under its prefix, or a supervisord whose command line names the prefix)."""
        for host in self.hosts:
            if host.current.exists():
                subprocess.run([str(host.current / "bin" / "launch"), "down", ENV], capture_output=True, text=True,
                               timeout=180, env=ansible_env(), cwd=host.current)
        left = stack_processes(self.root)
        signalled: set[int] = set()
        for proc in left:
            signalled.update(kill_tree(proc.pid))
        wait_until(lambda: not any(is_alive(p) for p in signalled), 30, what=f"fleet processes gone: {sorted(signalled)}")


def stack_processes(root: Path) -> list[psutil.Process]:
    """Live processes of any stack under root (zombies count as gone)."""
    prefix = str(root) + "/"
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            cmdline = proc.cmdline()
            supervisord = any(arg.endswith("supervisord") for arg in cmdline[:2])
            if proc.environ().get("KEEL_CONFIG", "").startswith(prefix) or (
                    supervisord and any(arg.startswith(prefix) for arg in cmdline)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def make_fleet(root: Path, source: Path, count: int = 3, jobs: dict | None = None, **group_vars) -> Fleet:
    (root / "sockets").mkdir(parents=True, exist_ok=True)
    hosts = [Host(name=f"node{i}", prefix=root / f"node{i}", port=free_port(), socket=root / "sockets" / f"node{i}.sock")
             for i in range(1, count + 1)]
    return Fleet(root=root, source=source, hosts=hosts, group_vars=group_vars, jobs=jobs or {})


def failures(output: str, limit: int = 6000) -> str:
    """Each task that failed a host, with its message: what a failed assertion on a playbook run must show
    (the output's tail is only the recap and the last task)."""
    tasks, current = [], ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            current = line
        elif line.startswith(("fatal: [", "failed: [")):
            tasks.append(f"{current}\n{line[:1500]}")
    return ("\n".join(tasks) or "no task failed")[:limit] + "\n...\n" + output[-1500:]


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host: {"node1": {"ok": 30, "changed": 0, "failed": 0, ...}} (summed over batches)."""
    result: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap and ":" in line and "=" in line:
            host, _, counters = line.partition(":")
            values = dict(item.split("=") for item in counters.split())
            result[host.strip()] = {k: int(v) for k, v in values.items()}
    return result
