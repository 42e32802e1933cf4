"""The playbooks parse for every inventory, and ansible-lint's production profile passes."""

from __future__ import annotations

import subprocess

import pytest

from tests.ansible.fleet import ANSIBLE_DIR, VENV_BIN, ansible_env

pytestmark = [pytest.mark.ansible]

INVENTORIES = sorted(p.name for p in (ANSIBLE_DIR / "inventories").iterdir() if p.is_dir())
PLAYBOOKS = ["site.yml", "rollback.yml", "multinode_rollback.yml"]


def test_there_are_three_inventories():
    assert INVENTORIES == ["dev", "prod", "staging"]


@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook, inventory):
    done = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", str(ANSIBLE_DIR / "inventories" / inventory),
                           str(ANSIBLE_DIR / playbook)], capture_output=True, text=True, timeout=120, env=ansible_env())
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_ansible_lint_production_profile():
    done = subprocess.run([str(VENV_BIN / "ansible-lint"), "--profile", "production", "--nocolor", "."],
                          capture_output=True, text=True, timeout=300, env=ansible_env(), cwd=ANSIBLE_DIR)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
