"""The hash-locked requirements: each requirements-X.txt is `make lock`'s compilation of requirements-X.in.

People edit the .in files (direct dependencies, exact pins); pip-compile writes the .txt locks (every transitive
dependency pinned, each with the sha256 of its files), and every install takes only the lock (`pip install
--require-hashes --no-deps`). These tests read the files only: a lock that no longer matches its .in, a pin without a
hash, or an install that skips the hashes fails here, in a second, instead of in CI's image build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

INPUTS = sorted(ROOT.glob("requirements*.in"))
# requirements.in (the pipeline) is a layer of requirements-dev.in, locked in requirements-dev.txt with it.
LOCKED_INPUTS = [path for path in INPUTS if path.name != "requirements.in"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


@dataclass
class LockedPackage:
    version: str
    hashes: list[str]
    via: list[str]  # pip-compile's annotation: the packages and `-r file.in` that ask for it


def lock_of(path: Path) -> Path:
    return path.with_suffix(".txt")


def read_pins(path: Path) -> dict[str, str]:
    """The exact pins of a .in file and of the .in files it includes with `-r`: canonical name -> version."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins |= read_pins(path.parent / line.removeprefix("-r ").strip())
        elif line and not line.startswith("-"):
            pin = PIN.match(line)
            assert pin, f"{path.name}: `{line}` is not an exact pin (name==version)"
            pins[canonicalize_name(pin[1])] = pin[2]
    return pins


def read_lock(path: Path) -> dict[str, LockedPackage]:
    """A pip-compile output: canonical name -> version, hashes and `# via` annotation of each requirement."""
    packages: dict[str, LockedPackage] = {}
    current: LockedPackage | None = None
    for entry in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        stripped = entry.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            note = stripped.lstrip("#").strip()
            note = note.removeprefix("via").strip()
            if current is not None and note:
                current.via.append(note)
            continue
        assert not entry[0].isspace(), f"{path.name}: unexpected indented line `{stripped}`"
        pin = PIN.match(stripped)
        assert pin, f"{path.name}: `{stripped}` is not an exact pin"
        current = LockedPackage(pin[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", stripped), [])
        packages[canonicalize_name(pin[1])] = current
    return packages


def test_every_input_has_its_lock_compiled_with_hashes_from_it():
    assert {path.name for path in LOCKED_INPUTS} >= {
        "requirements-serve.in", "requirements-dev.in", "requirements-aws.in", "requirements-scan.in",
        "requirements-lock.in"}
    for path in LOCKED_INPUTS:
        lock = lock_of(path)
        assert lock.exists(), f"{lock.name} is missing: run `make lock`"
        command = re.search(r"^#\s+(pip-compile .*)$", lock.read_text(), re.MULTILINE)
        assert command, f"{lock.name} is not pip-compile's output: run `make lock`"
        assert "--generate-hashes" in command[1].split(), f"{lock.name} was compiled without hashes"
        assert f"--output-file={lock.name}" in command[1].split() and command[1].endswith(f" {path.name}"), (
            f"{lock.name} was not compiled from {path.name}: {command[1]}")


@pytest.mark.parametrize("path", LOCKED_INPUTS, ids=lambda path: path.name)
def test_every_pin_of_an_input_is_in_its_lock_at_the_same_version(path: Path):
    locked = read_lock(lock_of(path))
    for name, version in read_pins(path).items():
        assert name in locked, f"{name} is in {path.name} but not in {lock_of(path).name}: run `make lock`"
        assert locked[name].version == version, (
            f"{path.name} pins {name}=={version}, {lock_of(path).name} has {locked[name].version}: run `make lock`")


@pytest.mark.parametrize("path", LOCKED_INPUTS, ids=lambda path: path.name)
def test_a_lock_holds_no_direct_dependency_its_inputs_dropped(path: Path):
    pins = read_pins(path)
    for name, package in read_lock(lock_of(path)).items():
        asked_by = [via for via in package.via if via.startswith("-r ")]
        assert not asked_by or name in pins, (
            f"{lock_of(path).name} still has {name} ({asked_by[0]}), which no .in asks for: run `make lock`")


@pytest.mark.parametrize("path", LOCKED_INPUTS, ids=lambda path: path.name)
def test_every_requirement_of_a_lock_carries_a_hash(path: Path):
    locked = read_lock(lock_of(path))
    assert locked, f"{lock_of(path).name} pins nothing"
    for name, package in locked.items():
        assert package.hashes, f"{lock_of(path).name}: {name}=={package.version} has no --hash: run `make lock`"


def test_the_image_and_the_venv_share_one_version_of_every_common_package():
    serve = read_lock(ROOT / "requirements-serve.txt")
    dev = read_lock(ROOT / "requirements-dev.txt")
    assert serve.keys() <= dev.keys(), f"serving packages missing from .venv: {sorted(serve.keys() - dev.keys())}"
    differ = {name: (package.version, dev[name].version) for name, package in serve.items()
              if package.version != dev[name].version}
    assert not differ, f"(serve, dev) versions differ: {differ}; run `make lock`"


@pytest.mark.parametrize("file", ["Makefile", "Dockerfile"])
def test_every_pip_install_requires_hashes_and_takes_a_lock_only(file: str):
    text = (ROOT / file).read_text().replace("\\\n", " ")
    installs = re.findall(r"pip install[^\n&;]*", text)
    assert installs, f"no pip install in {file}"
    for install in installs:
        assert "--require-hashes" in install and "--no-deps" in install, f"{file}: `{install}` skips the hashes"
    assert not re.search(r"-r\s+requirements[^\s]*\.in\b", text), f"{file} installs from an unlocked .in file"
