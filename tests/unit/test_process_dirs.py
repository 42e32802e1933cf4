"""keel.host.dirs: a process's dirs are 0750, and its tmp dir belongs to its `user:` (as root, with a real user)."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from keel.host.dirs import ProcessDirError, prepare_process_dirs
from keel.render.contract import load_process_file
from tests.support import PYTHON, REPO_ROOT

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and chown need root")


def _resolved(root: Path, user: str | None) -> dict:
    """The part of a resolved per-process file that prepare_process_dirs reads."""
    return {
        "user": user,
        "paths": {
            "run_dir": str(root / "run"),
            "log_dir": str(root / "log"),
            "checkpoint_dir": str(root / "ckpt"),
            "tmp_dir": str(root / "run" / "tmp" / "trainer"),
        },
    }


@pytest.fixture
def system_user():
    """A real system user (and its primary group), deleted afterwards."""
    name = f"keeltest-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
                   check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_process_dirs_are_created_0750_whatever_the_umask(tmp_path, umask):
    resolved = _resolved(tmp_path, None)
    old = os.umask(umask)
    try:
        prepare_process_dirs(resolved)
        prepare_process_dirs(resolved)  # twice: idempotent
    finally:
        os.umask(old)
    for d in ("run", "log", "ckpt", "run/tmp", "run/tmp/trainer"):
        mode = stat.S_IMODE((tmp_path / d).stat().st_mode)
        assert mode == 0o750, (d, oct(mode))


def test_without_a_user_nothing_is_chowned(tmp_path):
    prepare_process_dirs(_resolved(tmp_path, None))
    for d in ("run", "log", "ckpt", "run/tmp", "run/tmp/trainer"):
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), d


@as_root
def test_tmp_dir_belongs_to_the_process_user_and_its_group(tmp_path, system_user):
    (tmp_path / "run").mkdir()  # the stack's run dir exists already (made by launch or the Ansible role)
    prepare_process_dirs(_resolved(tmp_path, system_user.pw_name))
    owner = (system_user.pw_uid, system_user.pw_gid)
    tmp = (tmp_path / "run" / "tmp" / "trainer").stat()
    assert (tmp.st_uid, tmp.st_gid) == owner and stat.S_IMODE(tmp.st_mode) == 0o750
    # Created here, for this process: its parent, the log and checkpoint dirs are the user's too.
    for d in ("run/tmp", "log", "ckpt"):
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_gid) == owner, d
    run = (tmp_path / "run").stat()
    assert (run.st_uid, run.st_gid) == (0, 0)  # an existing shared dir keeps its owner


@as_root
def test_an_existing_tmp_dir_is_given_to_the_user(tmp_path, system_user):
    (tmp_path / "log").mkdir()
    (tmp_path / "run" / "tmp" / "trainer").mkdir(parents=True, mode=0o700)  # left by an earlier run as root
    prepare_process_dirs(_resolved(tmp_path, system_user.pw_name))
    tmp = (tmp_path / "run" / "tmp" / "trainer").stat()
    assert (tmp.st_uid, tmp.st_gid) == (system_user.pw_uid, system_user.pw_gid)
    assert stat.S_IMODE(tmp.st_mode) == 0o750
    assert (tmp_path / "log").stat().st_uid == 0  # shared and existing: not the process's to take


@pytest.fixture
def reachable_dir():
    """A dir another user can reach (pytest's tmp_path sits under a 0700 dir of root's)."""
    path = Path(tempfile.mkdtemp(prefix="keeltest-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@as_root
def test_the_user_can_write_its_tmp_dir(reachable_dir, system_user):
    # What ownership is for: the process, dropped to its user as supervisord does, can use its TMPDIR.
    tmp_path = reachable_dir
    prepare_process_dirs(_resolved(tmp_path, system_user.pw_name))
    probe = tmp_path / "run" / "tmp" / "trainer" / "probe"
    out = subprocess.run(["setpriv", f"--reuid={system_user.pw_uid}", f"--regid={system_user.pw_gid}", "--clear-groups",
                          PYTHON, "-c", f"open({str(probe)!r}, 'w').write('ok')"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert probe.read_text() == "ok" and probe.stat().st_uid == system_user.pw_uid


@as_root
def test_an_unknown_user_is_a_clear_error_and_creates_nothing(tmp_path):
    name = f"keeltest-absent-{secrets.token_hex(4)}"
    with pytest.raises(ProcessDirError, match=f"user '{name}' does not exist on this host"):
        prepare_process_dirs(_resolved(tmp_path, name))
    assert list(tmp_path.iterdir()) == []


@as_root
def test_a_symlink_in_place_of_the_tmp_dir_is_refused(tmp_path, system_user):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / "tmp").mkdir(parents=True)
    (tmp_path / "run" / "tmp" / "trainer").symlink_to(elsewhere)
    with pytest.raises(ProcessDirError, match="is not a directory"):
        prepare_process_dirs(_resolved(tmp_path, system_user.pw_name))
    assert elsewhere.stat().st_uid == 0  # root did not chown the link's target


@as_root
def test_not_root_with_a_user_chowns_nothing_and_needs_no_such_user(reachable_dir, system_user):
    # As the process's own user (how supervisord and systemd start it) the dirs are already its own;
    # a user that only exists on the deploy host is no error on a developer's machine.
    tmp_path = reachable_dir
    os.chmod(tmp_path, 0o777)
    # The checkout may sit under a dir only root can read (CI clones into a 0700 temp dir): give the
    # user its own copy of keel (keel.host.dirs needs only the standard library).
    code_dir = tmp_path / "code"
    shutil.copytree(REPO_ROOT / "keel", code_dir / "keel", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        f"import sys; sys.path.insert(0, {str(code_dir)!r});"
        "from keel.host.dirs import prepare_process_dirs;"
        f"prepare_process_dirs({_resolved(tmp_path / 'a', 'root')!r});"
        f"prepare_process_dirs({_resolved(tmp_path / 'b', 'no-such-user-here')!r})"
    )
    out = subprocess.run(["setpriv", f"--reuid={system_user.pw_uid}", f"--regid={system_user.pw_gid}", "--clear-groups",
                          PYTHON, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    for d in ("a/run/tmp/trainer", "a/log", "b/run/tmp/trainer"):
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_gid) == (system_user.pw_uid, system_user.pw_gid), d


def _render(root: Path, user: str) -> Path:
    """The trainer's resolved file, made by the real resolver (bin/render-config --out)."""
    cfg = root / "cfg"
    cfg.mkdir()
    base = {"project": "kt", "paths": {"root": str(root), "run_dir": str(root / "run"), "log_dir": str(root / "log"),
                                       "checkpoint_dir": str(root / "ckpt")},
            "processes": {"trainer": {"kind": "trainer", "user": user}}}
    (cfg / "base.yaml").write_text(json.dumps(base))  # JSON is YAML
    (cfg / "test.yaml").write_text("{}\n")
    done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg),
                           "--out", str(root / "build"), "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return root / "build" / "trainer.json"


@as_root
@pytest.mark.parametrize("form", ["mapping", "typed"])
def test_a_rendered_user_owns_the_tmp_dir(tmp_path, system_user, form):
    # End to end for the defect of issue 13: `user:` in the config reaches the resolved file and the tmp dir.
    path = _render(tmp_path, system_user.pw_name)
    resolved = json.loads(path.read_text()) if form == "mapping" else load_process_file(path)
    prepare_process_dirs(resolved)
    tmp = Path(json.loads(path.read_text())["paths"]["tmp_dir"]).stat()
    assert (tmp.st_uid, tmp.st_gid) == (system_user.pw_uid, system_user.pw_gid)


@as_root
def test_render_config_as_root_gives_the_tmp_dir_to_the_user_before_the_process_starts(tmp_path, system_user):
    # bin/render-config (not --out) makes the runtime dirs itself; the process may then start unprivileged.
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    base = {"project": "kt", "paths": {"root": str(tmp_path), "run_dir": str(tmp_path / "run"),
                                       "log_dir": str(tmp_path / "log"), "checkpoint_dir": str(tmp_path / "ckpt")},
            "processes": {"trainer": {"kind": "trainer", "user": system_user.pw_name}}}
    (cfg / "base.yaml").write_text(json.dumps(base))
    (cfg / "test.yaml").write_text("{}\n")
    env = {**os.environ, "KEEL_BUILD_ROOT": str(tmp_path / "build")}
    done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg), "-q",
                           "--no-reload"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    tmp = (tmp_path / "run" / "tmp" / "trainer").stat()
    assert (tmp.st_uid, tmp.st_gid) == (system_user.pw_uid, system_user.pw_gid)
    assert (tmp_path / "run").stat().st_uid == 0  # the shared run dir stays root's


@as_root
def test_render_config_names_an_unknown_user_and_exits_non_zero(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    base = {"project": "kt", "paths": {"root": str(tmp_path), "run_dir": "run", "log_dir": "log", "checkpoint_dir": "ck"},
            "processes": {"trainer": {"kind": "trainer", "user": "no-such-keel-user"}}}
    (cfg / "base.yaml").write_text(json.dumps(base))
    (cfg / "test.yaml").write_text("{}\n")
    env = {**os.environ, "KEEL_BUILD_ROOT": str(tmp_path / "build")}
    done = subprocess.run([str(REPO_ROOT / "bin" / "render-config"), "test", "--config-dir", str(cfg), "-q",
                           "--no-reload"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "render-config: user 'no-such-keel-user' does not exist on this host (the process's `user:`)"]
