"""A GitHub Actions runner for .github/workflows/retrain.yml, as far as this machine can be one.

Each job starts from a clone of `origin` (actions/checkout; `checkout` can be overridden, e.g. to start from a stale
commit). The other `uses:` steps are this machine: Python is the checkout's .venv, and the AWS credentials are moto's
dummy keys in `machine_env` (with AWS_ENDPOINT_URL, the one setting a real runner would not have). `run:` steps run
verbatim under `bash -eo pipefail`, their `${{ }}` expressions and `if:` conditions evaluated as GitHub does, and
lines a step appends to $GITHUB_ENV become environment variables of the steps after it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.fake_github import Dispatch

log = logging.getLogger(__name__)

WORKFLOW = Path(".github/workflows/retrain.yml")
# Generous: on a shared 2-core machine a small retrain has taken over 5 minutes.
RETRAIN_TIMEOUT_S = float(os.environ.get("RETRAIN_TIMEOUT_S", "900"))

EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")
COMPARISON = re.compile(r"^(.+?)\s*(==|!=)\s*'([^']*)'$")
STATUS_CHECKS = {"always()", "success()", "failure()"}


def evaluate(text: str, context: Mapping[str, Any]) -> str:
    """Substitute the `${{ a.b || c.d || 'literal' }}` expressions of `text` (the forms retrain.yml uses)."""
    return EXPRESSION.sub(lambda match: _first_set(match.group(1), context), text)


def _first_set(expression: str, context: Mapping[str, Any]) -> str:
    for term in (part.strip() for part in expression.split("||")):
        value = term.strip("'") if term.startswith("'") else _lookup(term, context)
        if value:
            return value
    return ""


def _lookup(path: str, context: Mapping[str, Any]) -> str:
    value: Any = context
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value if isinstance(value, str) else ""


def condition_holds(condition: str, context: Mapping[str, Any], workspace: Path, failed: bool) -> bool:
    """A step's `if:` as GitHub evaluates it, for the forms retrain.yml uses: `&&` of status checks (success()
    is implied when there is none) and comparisons `x == 'literal'` / `x != 'literal'`, x a context path or
    hashFiles('path')."""
    terms = [part.strip() for part in condition.split("&&")] if condition else []
    if not STATUS_CHECKS & set(terms):
        terms.append("success()")
    return all(_term_holds(term, context, workspace, failed) for term in terms)


def _term_holds(term: str, context: Mapping[str, Any], workspace: Path, failed: bool) -> bool:
    if term in STATUS_CHECKS:
        return {"always()": True, "success()": not failed, "failure()": failed}[term]
    comparison = COMPARISON.match(term)
    if comparison is None:
        raise ValueError(f"the test's runner cannot evaluate `{term}` in an `if:`: teach condition_holds")
    operand, operator, literal = comparison.groups()
    return (_operand(operand, context, workspace) == literal) == (operator == "==")


def _operand(operand: str, context: Mapping[str, Any], workspace: Path) -> str:
    files = re.fullmatch(r"hashFiles\('(.+)'\)", operand)
    if files is None:
        return _lookup(operand, context)
    path = workspace / files.group(1)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


@dataclass(frozen=True)
class Job:
    """One run of the retrain job: the outcome of each `run:` step that ran, by step name."""

    inputs: Mapping[str, str]
    workspace: Path
    steps: dict[str, subprocess.CompletedProcess]

    @property
    def succeeded(self) -> bool:
        return all(step.returncode == 0 for step in self.steps.values())

    def output(self, step: str) -> str:
        return self.steps[step].stdout + self.steps[step].stderr

    def log(self) -> str:
        return "\n".join(
            f"--- {name} (exit {step.returncode})\n{step.stdout}{step.stderr}" for name, step in self.steps.items()
        )


class ActionsRunner:
    """Runs the retrain job for each accepted dispatch, one at a time, as the workflow's concurrency group does."""

    def __init__(
        self,
        origin: Path,
        workdir: Path,
        machine_env: Mapping[str, str],
        variables: Mapping[str, str],
        secrets: Mapping[str, str],
    ) -> None:
        self.origin = origin
        self.workdir = workdir
        self.machine_env = machine_env
        self.variables = variables
        self.secrets = secrets
        self.jobs: list[Job] = []
        self.errors: list[BaseException] = []
        self._queue = threading.Lock()
        self._finished = threading.Condition()

    def __call__(self, dispatch: Dispatch) -> None:
        try:
            with self._queue:
                job = self._run(dispatch)
        except BaseException as error:
            with self._finished:
                self.errors.append(error)
                self._finished.notify_all()
            raise
        with self._finished:
            self.jobs.append(job)
            self._finished.notify_all()

    def wait_for_jobs(self, count: int, timeout_s: float = RETRAIN_TIMEOUT_S) -> list[Job]:
        """The first `count` finished jobs; fails when the runner broke or they take longer than `timeout_s`."""
        with self._finished:
            done = self._finished.wait_for(lambda: len(self.jobs) + len(self.errors) >= count, timeout_s)
            if self.errors:
                raise AssertionError(f"the runner failed: {self.errors!r}")
            if not done:
                raise TimeoutError(f"{count - len(self.jobs)} retrain job(s) still running after {timeout_s} s")
            return self.jobs[:count]

    def checkout(self, ref: str, workspace: Path) -> None:
        """actions/checkout: the dispatched ref's commit, full history, remote `origin`."""
        subprocess.run(["git", "clone", "-q", "--branch", ref, str(self.origin), str(workspace)], check=True)

    def _run(self, dispatch: Dispatch) -> Job:
        ref = dispatch.ref.removeprefix("refs/heads/")
        workspace = self.workdir / f"job-{len(self.jobs) + len(self.errors) + 1}"
        self.checkout(ref, workspace)
        return self.run_job(dispatch, ref, workspace)

    def run_job(self, dispatch: Dispatch, ref: str, workspace: Path, only: Collection[str] = ()) -> Job:
        """The job's steps in a checked-out `workspace`; with `only`, just the steps of those names, in the job's
        order and under their own `if:`, as if the others had succeeded."""
        definition = yaml.safe_load((workspace / WORKFLOW).read_text())["jobs"]["retrain"]
        context: dict[str, Any] = {
            "inputs": dict(dispatch.inputs),
            "github": {"event": {"inputs": dispatch.inputs}},
            "vars": self.variables,
            "secrets": self.secrets,
            "env": {},
            "steps": {},
        }
        for name, value in definition.get("env", {}).items():
            context["env"][name] = evaluate(str(value), context)
        runner_env = {
            **self.machine_env,
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_REF_NAME": ref,
            "GITHUB_STEP_SUMMARY": str(workspace.with_suffix(".summary.md")),
            "GITHUB_ENV": str(workspace.with_suffix(".env")),
            **context["env"],
        }
        Path(runner_env["GITHUB_ENV"]).write_text("")
        steps: dict[str, subprocess.CompletedProcess] = {}
        for step in definition["steps"]:
            failed = not all(done.returncode == 0 for done in steps.values())
            if "run" not in step or (only and step["name"] not in only):
                continue
            if not condition_holds(str(step.get("if", "")), context, workspace, failed):
                continue
            env = {**runner_env, **{k: evaluate(str(v), context) for k, v in step.get("env", {}).items()}}
            steps[step["name"]] = done = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", evaluate(step["run"], context)],
                cwd=workspace,
                env=env,
                capture_output=True,
                text=True,
                timeout=RETRAIN_TIMEOUT_S,
            )
            for line in Path(runner_env["GITHUB_ENV"]).read_text().splitlines():
                name, _, value = line.partition("=")
                runner_env[name] = value
            if "id" in step:
                outcome = "success" if done.returncode == 0 else "failure"
                context["steps"][step["id"]] = {"outcome": outcome, "conclusion": outcome}
        job = Job(dispatch.inputs, workspace, steps)
        workspace.with_suffix(".log").write_text(job.log())
        log.info("retrain job for %s: %s", dict(dispatch.inputs), "succeeded" if job.succeeded else "failed")
        return job
