"""scripts/publish_lock.sh: the retrain job's git side, against a local bare repository standing in for GitHub."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import clean_environment
from tests.servers import ROOT

pytestmark = pytest.mark.integration  # git and the script, as subprocesses

SCRIPT = ROOT / "scripts" / "publish_lock.sh"
IDENTITY = {"GIT_AUTHOR_NAME": "bot", "GIT_AUTHOR_EMAIL": "bot@example.com",
            "GIT_COMMITTER_NAME": "bot", "GIT_COMMITTER_EMAIL": "bot@example.com"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          env={**clean_environment(), **IDENTITY}).stdout.strip()


def publish_lock(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**clean_environment(), **IDENTITY})


def commit_file(clone: Path, name: str, text: str, message: str) -> None:
    (clone / name).write_text(text)
    git(clone, "add", name)
    git(clone, "commit", "-qm", message)
    git(clone, "push", "-q", "origin", "HEAD:main")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    (seed / "dvc.lock").write_text("data: v1\n")
    (seed / "params.yaml").write_text("seed: 1\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-qm", "v1")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
    return bare


def clone(origin: Path, name: str) -> Path:
    path = origin.parent / name
    subprocess.run(["git", "clone", "-q", "--branch", "main", str(origin), str(path)], check=True)
    return path


def lock_on(origin: Path) -> str:
    return git(origin, "show", "main:dvc.lock")


def test_sync_moves_a_stale_checkout_to_the_branch_tip(origin):
    stale, other = clone(origin, "stale"), clone(origin, "other")
    commit_file(other, "dvc.lock", "data: v2\n", "retrain v2")
    result = publish_lock(stale, "sync", "main")
    assert result.returncode == 0, result.stderr
    assert "the newest tip (1 commit(s) after the dispatched" in result.stderr
    assert (stale / "dvc.lock").read_text() == "data: v2\n"


def test_publish_commits_only_dvc_lock_on_the_newest_tip_without_a_conflict(origin):
    job, other = clone(origin, "job"), clone(origin, "other")
    assert publish_lock(job, "sync", "main").returncode == 0
    (job / "dvc.lock").write_text("data: v3\n")
    (job / "params.yaml").write_text("seed: 99\n")  # a stray change in the job's workspace is not published
    commit_file(other, "README.md", "pushed while the job ran\n", "docs")  # the branch moves meanwhile

    result = publish_lock(job, "publish", "main", "retrain: dvc.lock for s3://b/k")
    assert result.returncode == 0, result.stderr
    assert lock_on(origin) == "data: v3"  # git() strips the trailing newline
    assert git(origin, "show", "main:README.md") == "pushed while the job ran"
    assert git(origin, "show", "main:params.yaml") == "seed: 1"
    assert git(origin, "log", "--format=%s", "main").splitlines() == ["retrain: dvc.lock for s3://b/k", "docs", "v1"]


def test_publish_does_nothing_when_the_run_left_dvc_lock_as_it_found_it(origin):
    job = clone(origin, "job")
    assert publish_lock(job, "sync", "main").returncode == 0
    result = publish_lock(job, "publish", "main", "retrain: nothing")
    assert result.returncode == 0
    assert "publish_lock: dvc.lock unchanged" in result.stderr
    assert git(origin, "log", "--format=%s", "main").splitlines() == ["v1"]


def test_publish_without_sync_refuses_and_names_the_fix(origin):
    job = clone(origin, "job")
    result = publish_lock(job, "publish", "main", "retrain")
    assert result.returncode == 1
    assert "publish_lock: run `" in result.stderr and "sync main` before the retrain" in result.stderr


# A git in front of the real one that notes, for each call, its arguments and the extra configuration git's
# environment gives it: what `with_token` hands over.
RECORDING_GIT = """#!/bin/bash
printf '%s | %s=%s\\n' "$*" "${GIT_CONFIG_KEY_0:-}" "${GIT_CONFIG_VALUE_0:-}" >> "$GIT_CALLS"
exec "$REAL_GIT" "$@"
"""


def test_the_token_reaches_fetch_and_push_as_a_header_in_gits_environment_and_nowhere_else(origin, tmp_path):
    token = "ghs_publish-lock-test-token"
    header = "AUTHORIZATION: basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
    workspace = clone(origin, "job")
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "git").write_text(RECORDING_GIT)
    (wrapper / "git").chmod(0o755)
    calls = tmp_path / "calls"
    env = {**clean_environment(), **IDENTITY, "GIT_PUSH_TOKEN": token, "GIT_CALLS": str(calls),
           "REAL_GIT": shutil.which("git"), "PATH": f"{wrapper}:{os.environ['PATH']}"}

    for args in (("sync", "main"), ("publish", "main", "retrain: dvc.lock")):
        if args[0] == "publish":
            (workspace / "dvc.lock").write_text("data: v2\n")
        run = subprocess.run([str(SCRIPT), *args], cwd=workspace, env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr

    lines = calls.read_text().splitlines()
    remote = [line for line in lines if line.startswith(("fetch", "push"))]
    assert [line.split()[0] for line in remote] == ["fetch", "fetch", "push"]
    assert all(line.endswith(f"http.https://github.com/.extraheader={header}") for line in remote)
    assert all(token not in line.split(" | ")[0] for line in lines)  # never an argument
    assert all(line.endswith(" | =") for line in lines if line not in remote)  # only the remote calls get it
    assert token not in (workspace / ".git" / "config").read_text() and header not in (
        workspace / ".git" / "config").read_text()
    assert lock_on(origin) == "data: v2"


def test_the_retrain_job_persists_no_token_and_hands_it_to_the_two_remote_steps_only():
    job = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())["jobs"]["retrain"]
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False
    given = [step["name"] for step in job["steps"] if "github.token" in yaml.safe_dump(step)]
    assert given == ["Newest branch tip", "Commit dvc.lock"]
    steps = [step.get("name") for step in job["steps"]]
    assert steps.index("Newest branch tip") < steps.index("Pin the upload") < steps.index("Retrain") < steps.index(
        "Commit dvc.lock")  # before anything is installed, after every model is loaded
