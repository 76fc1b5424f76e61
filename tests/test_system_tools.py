"""`make tools` (scripts/system_tools.sh) installs every program the suite runs that pip cannot install.

A fresh machine has Python and make; the virtualenv brings everything on PyPI. Any other program a test or a
script under test runs must be in system_tools.sh's table, or `make test` passes only where someone installed it
by hand. The programs are found where the code names them: the first word of a literal argv in tests/, the
name given to debian_tool or shutil.which, and a `command -v` guard in scripts/ or the Makefile.
"""

import re

from tests.servers import ROOT

# What a machine has before `make`: the README's prerequisites and the base system's own commands.
BASE_SYSTEM = {"python", "make", "bash", "sudo", "systemctl"}
# Programs the repository itself provides (the Docker client the deploy tests run is tests/fake_docker/docker).
OURS = {"docker"}


def packages_of_tools() -> dict[str, str]:
    """system_tools.sh's table: command on PATH -> the Debian package that provides it."""
    script = (ROOT / "scripts" / "system_tools.sh").read_text()
    table = re.search(r"declare -A package_of=\((.*?)\n\)", script, re.DOTALL)
    assert table, "scripts/system_tools.sh has no `declare -A package_of=(...)` table"
    return dict(re.findall(r"\[([\w-]+)\]=([\w-]+)", table.group(1)))


def programs_the_suite_runs() -> dict[str, str]:
    """Each program named by tests/ or by a guard in scripts/ and the Makefile -> the first file naming it."""
    found: dict[str, str] = {}
    argv = re.compile(r"""(?:run|Popen|check_output|check_call)\(\s*\[\s*["']([\w.-]+)["']""")
    lookup = re.compile(r"""(?:debian_tool|shutil\.which)\(\s*["']([\w.-]+)["']""")
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for pattern in (argv, lookup):
            for name in pattern.findall(path.read_text()):
                found.setdefault(name, str(path.relative_to(ROOT)))
    guard = re.compile(r"command -v ([\w.-]+)")
    for path in [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / "Makefile"]:
        for name in guard.findall(path.read_text()):
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_the_table_maps_commands_to_debian_packages():
    table = packages_of_tools()
    assert {"promtool", "chromium", "chromedriver", "buildah", "debootstrap", "dot"} <= set(table)
    assert table["chromedriver"] == "chromium-driver"


def test_every_program_the_suite_runs_is_installed_by_make_venv_or_make_tools():
    installed_by_pip = {path.name for path in (ROOT / ".venv" / "bin").iterdir()}
    table = packages_of_tools()
    programs = programs_the_suite_runs()
    assert {"git", "make", "promtool", "chromedriver"} <= set(programs), "the scan no longer finds known programs"
    unaccounted = {name: where for name, where in programs.items()
                   if name not in table and name not in installed_by_pip | BASE_SYSTEM | OURS}
    assert not unaccounted, (f"these programs are run by the suite but installed by nothing: {unaccounted}; add each "
                             "to package_of in scripts/system_tools.sh (or to requirements-dev.in if pip has it)")
