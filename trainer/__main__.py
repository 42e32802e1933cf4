"""`python -m trainer --config build/<env>/trainer.json`: the isolated training process.

Start-up order matters: read the resolved file, claim GPUs and set
CUDA_VISIBLE_DEVICES and TMPDIR, and only then import torch (CUDA reads the
variable once, at initialisation). The status file says state=starting before
the slow torch import, so the watchdog sees a process that is starting, not a
missing one.

Exit codes: 0 stopped (signal, max_steps, or the entry returned), 1 failed
(an exception; state=failed with last_error), 2 bad command line or config file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Sequence

from keel.logs import setup_logging
from keel.status.models import State
from keel.status.reporter import ProcessReporter
from keel.host.dirs import prepare_process_dirs
from keel.host.gpu_allocation import allocate_gpus

from trainer import distributed
from trainer.sdnotify import Notifier
from keel.render.contract import ContractError, load_process_file
from keel.render.torchrun import rank_status_name

from trainer.settings import TrainerSettings, choose_tmpdir, from_process_file
from trainer.signals import StopFlag
from trainer import stackdump
from trainer import multinode

from trainer.runs import BUILTIN_ENTRY, new_run_id


def resolve_entry(spec: str | None) -> Callable[[Any], Any]:
    """Import `module:function` (default: the built-in job)."""
    module_name, sep, func_name = (spec or BUILTIN_ENTRY).partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"entry must look like 'package.module:function', not {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in func_name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"entry {spec!r} is not callable")
    return obj


def status_name(settings: TrainerSettings, info: distributed.DistInfo | None) -> str:
    """`trainer`, or one status file per rank under torchrun (`trainer.rank<N>`; multi-node `trainer.<node>.r<local rank>`)."""
    if info is None:
        return settings.name
    node = settings.torchrun.node
    return rank_status_name(settings.name, info.rank if node is None else info.local_rank, node)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("KEEL_CONFIG"), help="resolved trainer.json")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config (or KEEL_CONFIG) is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; returns the exit code."""
    args = _parse_args(argv)
    try:
        resolved = load_process_file(args.config)
        settings = from_process_file(resolved, args.config)
    except ContractError as e:  # names the file and the key
        print(f"trainer: {e}", file=sys.stderr)
        return 2

    # Signals first: a SIGTERM during the slow start-up must stop us cleanly, not kill us.
    stop = StopFlag()
    stop.install()
    stackdump.register(settings.run_dir)  # before the slow start-up: a hang there gets stacks too
    info = distributed.detect(os.environ)
    if info is not None:
        distributed.die_with_agent()
    name = status_name(settings, info)
    log = setup_logging(name, settings.log_format, settings.log_level)
    prepare_process_dirs(resolved)
    tmp_dir, fell_back = choose_tmpdir(settings.tmp_dir, name, os.getuid())
    if fell_back:
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        if tmp_dir.lstat().st_uid != os.getuid() or tmp_dir.is_symlink():
            # Someone else's directory in /tmp must not receive our sockets.
            print(f"trainer: {tmp_dir} exists and is not ours; shorten paths.tmp_dir", file=sys.stderr)
            return 2
        log.warning(
            "tmp_dir %s is too long for unix sockets; using %s",
            settings.tmp_dir,
            tmp_dir,
            extra={"event": "tmpdir_fallback"},
        )
    os.environ["TMPDIR"] = str(tmp_dir)
    tempfile.tempdir = None  # forget a temp dir chosen before TMPDIR was set

    gpu_indices: list[int] = []
    allocation = None
    alloc_error: Exception | None = None
    if settings.auto_gpus is not None:
        try:
            allocation = allocate_gpus(settings.auto_gpus, settings.run_dir, owner=name)
            gpu_indices = list(allocation.indices)
            os.environ["CUDA_VISIBLE_DEVICES"] = allocation.cuda_visible_devices
        except Exception as e:  # noqa: BLE001 - reported as state=failed below
            alloc_error = e
    else:
        gpu_indices = list(settings.gpus)
        if not gpu_indices:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no GPUs means none, not "all of them"

    reporter = ProcessReporter(
        settings.run_dir,
        name,
        "trainer",
        durability=settings.durability,  # type: ignore[arg-type]
        heartbeat_interval=settings.heartbeat_interval,
        gpus=gpu_indices,
    )
    run_id = new_run_id()  # trainer.runs has no torch: the first snapshot does not wait for it; a resume adopts
    # the id stored in its checkpoint
    reporter.start(
        payload={
            "run_id": run_id,
            "total_steps": settings.max_steps,
            "rank": info.rank if info else 0,
            "world_size": info.world_size if info else 1,
        }
    )
    log.info("state starting", extra={"event": "state", "state": "starting", "config": str(args.config)})
    notifier = Notifier()
    run = None
    try:
        if alloc_error is not None:
            raise alloc_error
        run = _build_run(settings, info, reporter, stop, notifier, log, gpu_indices, run_id)
        multinode.check_at_start(settings.torchrun, info, settings.checkpoint_dir)  # multi-node: a shared checkpoint_dir
        entry = resolve_entry(settings.entry)
        entry(run)
        run.begin_stopping()
        run.flush()
        run.ledger.end("stopped" if stop.is_set() else "completed")
        distributed.barrier()  # rank 0 may still be writing the final checkpoint
        reporter.close(State.STOPPED)
        log.info("state stopped", extra={"event": "state", "state": "stopped", "step": run.step})
        _record_exit(settings, name, 0, run.step, None, stop)
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the status file
        error = f"{type(e).__name__}: {e}"
        log.error("training failed: %s", error, exc_info=True, extra={"event": "failed"})
        if run is not None:
            try:
                run.flush()
            except Exception:  # noqa: BLE001 - the status write below matters more
                pass
            run.ledger.end("failed", error)
        reporter.close(State.FAILED, error)
        log.info("state failed", extra={"event": "state", "state": "failed"})
        _record_exit(settings, name, 1, run.step if run is not None else None, e, stop)
        return 1
    finally:
        notifier.stopping()
        notifier.close()
        distributed.shutdown()
        if allocation is not None:
            allocation.release()


def _record_exit(settings: TrainerSettings, name: str, code: int, step: int | None, error: BaseException | None,
                 stop: StopFlag) -> None:
    """``<name>.exit.json``: how this run ended, for the watchdog (keel.status.exits); never raises, we are dying."""
    import signal as _signal

    from keel.status.exits import exit_record_for, write_exit_record

    sig = _signal.Signals(stop.signum).name if stop.signum is not None else None
    try:
        write_exit_record(settings.run_dir, name, exit_record_for(code, step, error, sig))
    except Exception:  # noqa: BLE001 - the exit code still tells the backend
        pass


def _build_run(
    settings: TrainerSettings,
    info: distributed.DistInfo | None,
    reporter: ProcessReporter,
    stop: StopFlag,
    notifier: Notifier,
    log: logging.Logger,
    gpu_indices: list[int],
    run_id: str,
):
    """Import torch, pick the device, join torchrun's group, and assemble the `Run`."""
    import functools

    import torch

    from trainer.checkpoint import CheckpointStore
    from trainer.run import Run
    from trainer.runs import RunArchive, RunLedger

    torch.set_num_threads(settings.threads)
    local_rank = info.local_rank if info else 0
    device = torch.device(distributed.select_device(torch.cuda.is_available(), bool(gpu_indices), local_rank))
    distributed.apply_memory_limit(device, settings.gpu_memory_fraction, settings.gpu_memory_bytes)
    any_rank = None
    if info is not None:
        backend = distributed.choose_backend(settings.backend, device.type == "cuda")
        distributed.init(info, backend, device)
        any_rank = functools.partial(distributed.any_rank, device=device)
        run_id = distributed.shared_run_id(run_id)  # every rank names rank 0's run (a resume adopts the checkpoint's)
        reporter.update_payload(run_id=run_id)
    gpu_memory = (lambda: int(torch.cuda.memory_allocated(device))) if device.type == "cuda" else None

    holder: dict[str, Run] = {}

    def on_corrupt(path: os.PathLike, error: BaseException) -> None:
        holder["run"].event("checkpoint_corrupt", path=str(path), error=str(error), level=logging.WARNING)

    store = CheckpointStore(settings.checkpoint_dir, settings.checkpoint.keep, on_corrupt=on_corrupt)
    if info is None or info.is_main:
        for p in store.remove_stale_temps():
            log.warning("removed stale checkpoint temp file %s", p, extra={"event": "checkpoint_temp_removed"})
    ledger = RunLedger(settings, store=store, logger=logging.getLogger("keel.trainer"))
    if info is None or info.is_main:  # one archive writer per run
        ledger.archive = RunArchive(settings.run_dir, settings.name, keep=settings.runs.keep, max_bytes=settings.runs.max_bytes,
                                    inputs=ledger.inputs, digest=ledger.digest)
    run = Run(
        settings,
        reporter=reporter,
        store=store,
        stop=stop,
        notifier=notifier,
        device=device,
        logger=logging.getLogger("keel.trainer"),
        rank=info.rank if info else 0,
        world_size=info.world_size if info else 1,
        any_rank=any_rank,
        gpu_memory=gpu_memory,
        run_id=run_id,
        ledger=ledger,
    )
    holder["run"] = run
    reporter.update_payload(device=str(device))
    log.info("device selected", extra={"event": "device", "device": str(device), "threads": settings.threads})
    return run


if __name__ == "__main__":
    sys.exit(main())
