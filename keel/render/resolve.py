"""Turn a validated environment into what each process reads: absolute paths, commands, GPUs.

Pure: no file is read or written here. `stack_file` returns `keel.json` (everything,
for the tools) and `process_file` one file per process (only what that process
needs), as the typed models of keel.render.contract; nothing else defines their
shape. Keeping a process's own file free of other
processes' settings is what lets `supervisorctl update` leave it alone when only a
sibling changed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from keel.config.model import KeelConfig, TrainerProcess
from keel.render import contract
from keel.render import torchrun as torchrun_render
from keel.render.contract import FORMAT_VERSION

# The watchdog's fixed tuning, stated here so its file carries every value it uses.
# Scrapers read the textfile every 15-60 s; rewriting it more often only costs CPU.
PROMETHEUS_INTERVAL = 5.0
RESTART_JITTER = "full"


@dataclass(frozen=True)
class Context:
    """Where the environment is rendered from and to."""

    env: str
    code_dir: Path  # the keel checkout (physical path: a release dir, not the `current` symlink)
    build_dir: Path  # where the resolved files go (build/<env> or --out)
    sources: tuple[str, ...]  # the YAML files, for the "generated from" header
    backend: str  # supervisord | systemd (the config's, or --backend)
    # The host the files are rendered for: a multi-node job's default node name. Read once, when the
    # context is made, so resolving stays settings in, values out.
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def header(self) -> str:
        return f"generated from {' + '.join(self.sources)} by bin/render-config; do not edit"


def _abs(path: str, base: Path) -> str:
    return os.path.normpath(str(base / path)) if not os.path.isabs(path) else os.path.normpath(path)


def resolve_paths(config: KeelConfig, ctx: Context) -> dict[str, str]:
    root = _abs(config.paths.root, ctx.code_dir)
    return {
        "root": root,
        "run_dir": _abs(config.paths.run_dir, Path(root)),
        "log_dir": _abs(config.paths.log_dir, Path(root)),
        "checkpoint_dir": _abs(config.paths.checkpoint_dir, Path(root)),
    }


def python_path(config: KeelConfig, ctx: Context) -> str:
    return config.python or str(ctx.code_dir / ".venv" / "bin" / "python")


def torchrun_settings(proc: TrainerProcess, config: KeelConfig, ctx: Context) -> dict[str, Any]:
    """The trainer's resolved torchrun block (multi-node: rendezvous id and node name filled in)."""
    return torchrun_render.resolve(proc.torchrun, project=config.project, env=ctx.env, release=ctx.code_dir.name, hostname=ctx.hostname)


def status_names(name: str, proc: Any, config: KeelConfig, ctx: Context) -> list[str]:
    """The status files a process writes: one, or one per torchrun rank on this host."""
    if isinstance(proc, TrainerProcess) and proc.launcher == "torchrun" and proc.command is None:
        return torchrun_render.status_names(name, torchrun_settings(proc, config, ctx))
    return [name]


def process_command(name: str, proc: Any, config: KeelConfig, ctx: Context) -> list[str]:
    """The argv the backend runs. keel's own kinds default to their module; `command:` overrides."""
    if proc.command is not None:
        return list(proc.command)
    python = python_path(config, ctx)
    config_file = str(ctx.build_dir / f"{name}.json")
    if proc.kind == "trainer":
        if proc.launcher == "torchrun":
            torchrun = str(PurePath(python).parent / "torchrun")
            return torchrun_render.command(torchrun, torchrun_settings(proc, config, ctx), config_file)
        return [python, "-m", "trainer", "--config", config_file]
    if proc.kind == "dashboard":
        return [python, "-m", "dashboard", "--config", config_file]
    if proc.kind == "watchdog":
        return [python, "-m", "keel.watchdog", "--config", config_file]
    raise AssertionError(f"kind {proc.kind} has no default command")  # the model requires one


def program_name(config: KeelConfig, name: str) -> str:
    """The supervisord program of a process; computed here only, carried in keel.json."""
    return f"{config.project}-{name}"


def unit_name(config: KeelConfig, name: str) -> str:
    """The systemd unit of a process; computed here only, carried in keel.json."""
    return f"{config.project}-{name}.service"


def process_environment(name: str, proc: Any, paths: dict[str, str], ctx: Context) -> dict[str, str]:
    """Environment every keel process gets; the user's `environment:` adds to it.

    The model refuses user names starting with KEEL_ (keel.config.model.ProcessBase), so a
    user variable can neither override nor silently lose to one of ours.
    """
    env = {
        "KEEL_PROCESS": name,
        "KEEL_CONFIG": str(ctx.build_dir / f"{name}.json"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ctx.code_dir),
        "TMPDIR": str(Path(paths["run_dir"]) / "tmp" / name),
    }
    if proc.kind in ("dashboard", "watchdog") or not proc.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # never touch CUDA
    elif isinstance(proc.gpus, list):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in proc.gpus)
    # auto:N: the trainer picks its GPUs at start (keel.host.gpu_allocation.allocate_gpus) and sets it itself.
    if proc.kind == "trainer":
        env["OMP_NUM_THREADS"] = str(proc.threads)
    env.update(proc.environment)
    return env


def _gpus(proc: Any) -> contract.Gpus:
    if isinstance(proc.gpus, str):
        return contract.GpuAuto(auto=proc.gpu_auto_count())
    return list(proc.gpus or [])


def _limits(proc: Any) -> contract.Limits:
    gpu = proc.limits.gpu_memory
    return contract.Limits(
        memory_bytes=proc.limits.memory,
        gpu_memory_bytes=gpu if isinstance(gpu, int) else None,
        gpu_memory_fraction=gpu if isinstance(gpu, float) else None,
    )


def _trainer_block(proc: TrainerProcess, config: KeelConfig, ctx: Context) -> contract.TrainerBlock:
    return contract.TrainerBlock(
        entry=proc.entry,
        launcher=proc.launcher,
        threads=proc.threads,
        seed=proc.seed,
        max_steps=proc.max_steps,
        batch_size=proc.batch_size,
        learning_rate=float(proc.learning_rate),
        val_every_steps=proc.val_every_steps,
        num_workers=proc.num_workers,
        on_nan=proc.on_nan,
        params=dict(proc.params),
        torchrun=contract.Torchrun(**torchrun_settings(proc, config, ctx)),
        checkpoint=contract.Checkpoint(**proc.checkpoint.model_dump(mode="python")),
        report=contract.Report(**proc.report.model_dump(mode="python")),
        runs=contract.Runs(**proc.runs.model_dump(mode="python")),
    )


def _dashboard_block(proc: Any, ctx: Context) -> contract.DashboardBlock:
    return contract.DashboardBlock(
        address=proc.address,
        port=proc.port,
        allow_websocket_origin=list(proc.allow_origins or [f"127.0.0.1:{proc.port}", f"localhost:{proc.port}"]),
        refresh=proc.refresh,
        history_points=proc.history_points,
        log_tail_lines=proc.log_tail_lines,
        keep_alive=proc.keep_alive,
        unused_session_lifetime=proc.unused_session_lifetime,
        auth=contract.Auth(**proc.auth.model_dump(mode="python")),
        stack=str(ctx.build_dir / "keel.json"),
    )


def _watchdog_block(proc: Any, ctx: Context, paths: dict[str, str]) -> contract.WatchdogBlock:
    textfile = proc.prometheus_textfile
    return contract.WatchdogBlock(
        poll_interval=proc.poll_interval,
        rss_consecutive_polls=proc.rss_consecutive_polls,
        stable_after=proc.stable_after,
        alert=contract.Alert(command=proc.alert.command, timeout=proc.alert.timeout),
        prometheus_textfile=_abs(textfile, Path(paths["run_dir"])) if textfile else None,
        prometheus_interval=PROMETHEUS_INTERVAL,
        jitter=RESTART_JITTER,
        stack=str(ctx.build_dir / "keel.json"),
        incidents=contract.Incidents(**proc.incidents.model_dump(mode="python")),
        same_crash=contract.SameCrash(**proc.same_crash.model_dump(mode="python")),
    )


def process_file(name: str, config: KeelConfig, ctx: Context) -> contract.ProcessFile:
    """`build/<env>/<name>.json`: the resolved settings one process reads, nothing else."""
    proc = config.processes[name]
    paths = resolve_paths(config, ctx)
    blocks: dict[str, Any] = {}
    if proc.kind == "trainer":
        blocks["trainer"] = _trainer_block(proc, config, ctx)
    elif proc.kind == "dashboard":
        blocks["dashboard"] = _dashboard_block(proc, ctx)
    elif proc.kind == "watchdog":
        blocks["watchdog"] = _watchdog_block(proc, ctx, paths)
    else:
        blocks["command"] = contract.CommandBlock(port=proc.port)
    return contract.ProcessFile(
        generated=ctx.header,
        format_version=FORMAT_VERSION,
        project=config.project,
        environment=ctx.env,
        name=name,
        kind=proc.kind,
        user=proc.user,
        durability=config.durability,
        paths=contract.ProcessPaths(**paths, tmp_dir=str(Path(paths["run_dir"]) / "tmp" / name)),
        gpus=_gpus(proc),
        limits=_limits(proc),
        heartbeat_interval=proc.health.heartbeat_interval,
        stop_timeout=proc.stop.timeout,
        log=contract.LogBlock(format=proc.log.format, level=proc.log.level),
        **blocks,
    )


def supervisord_socket(config: KeelConfig, paths: dict[str, str]) -> str:
    if config.supervisord.socket:
        return config.supervisord.socket
    if config.supervisord.mode == "include":
        return "/var/run/supervisor.sock"
    return str(Path(paths["run_dir"]) / "supervisor.sock")


def dashboard_url(config: KeelConfig) -> str | None:
    """What a user types: the first allowed origin (a public name) or the bind address."""
    for proc in config.processes.values():
        if proc.kind == "dashboard":
            if proc.allow_origins:
                return f"http://{proc.allow_origins[0]}/"
            host = f"[{proc.address}]" if ":" in proc.address else proc.address
            return f"http://{host}:{proc.port}/"
    return None


def _stack_process(name: str, proc: Any, config: KeelConfig, ctx: Context, paths: dict[str, str]) -> contract.StackProcess:
    return contract.StackProcess(
        kind=proc.kind,
        program=program_name(config, name),
        unit=unit_name(config, name),
        user=proc.user,
        command=process_command(name, proc, config, ctx),
        config_file=str(ctx.build_dir / f"{name}.json"),
        status_names=status_names(name, proc, config, ctx),
        log_file=str(Path(paths["log_dir"]) / f"{name}.log"),
        gpus=_gpus(proc),
        limits=_limits(proc),
        health=contract.Health(**proc.health.model_dump(mode="python")),
        restart=contract.Restart(**proc.restart.model_dump(mode="python")),
        stop=contract.Stop(**proc.stop.model_dump(mode="python")),
        port=getattr(proc, "port", None),
        priority=proc.priority,
        autostart=proc.autostart,
    )


def stack_file(config: KeelConfig, ctx: Context) -> contract.StackFile:
    """`build/<env>/keel.json`: everything, for the watchdog, bin/launch, bin/status and bin/doctor."""
    paths = resolve_paths(config, ctx)
    sv = config.supervisord
    if sv.mode == "standalone":
        sv_config = str(ctx.build_dir / "supervisord.conf")
    else:
        sv_config = str(Path(sv.conf_dir) / f"{config.project}.conf")
    return contract.StackFile(
        generated=ctx.header,
        format_version=FORMAT_VERSION,
        project=config.project,
        environment=ctx.env,
        backend=ctx.backend,
        durability=config.durability,
        paths=contract.StackPaths(**paths, build_dir=str(ctx.build_dir)),
        control=contract.Control(
            backend=ctx.backend,
            mode=sv.mode,
            socket=supervisord_socket(config, paths),
            config=sv_config,
            pidfile=str(Path(paths["run_dir"]) / "supervisord.pid"),
            unit_dir=config.systemd.unit_dir,
            target=f"{config.project}.target",
        ),
        dashboard_url=dashboard_url(config),
        processes={name: _stack_process(name, proc, config, ctx, paths) for name, proc in config.processes.items()},
    )
