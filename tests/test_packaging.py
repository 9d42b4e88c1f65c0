"""What `python -m build` makes: an sdist whose tests run from it, and a wheel whose
metadata is ready to publish.

The sdist and the wheel are built once for the module, with `python -m build` (the
`build` package of the test extra), into a temporary folder: the wheel is built
from the sdist, as `build` does by default, so that alone shows the sdist is
complete enough to build. The real proof that the sdist's tests run from the sdist
is the last test: it unpacks the sdist, adds nothing to it, and runs a fast part of
its own test suite inside it with this environment's Python.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

import aioserver

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "aioserver-tcp"  # PyPI's "aioserver" is an unrelated project
STEM = f"aioserver_tcp-{aioserver.__version__}"  # the files' normalized name and version
BUILD_TIMEOUT_S = 100  # about 5 s with hatchling in pip's cache
RUN_TIMEOUT_S = 60  # the subset below takes about 2 s
# Fast, and between them they import the package, the test helpers, conftest and
# the pytest plugin, and read scripts/: enough to show the suite runs from the sdist.
SUBSET = [
    "tests/test_protocols.py",
    "tests/test_proxy.py",
    "tests/test_bench.py::test_the_bench_sources_name_no_other_address",
]
CLASSIFIERS = {
    "Development Status :: 4 - Beta",
    "Intended Audience :: Developers",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Topic :: System :: Networking",
    "Framework :: AsyncIO",
    "Framework :: Pytest",
    "Typing :: Typed",
}
# Work-tree litter that must never reach a distribution.
LITTER = re.compile(
    r"(^|/)(__pycache__|\.venv|\.git|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.bench-build"
    r"|\.coverage[^/]*|dist|build|bench-results\.png)(/|$)"
)


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


def sdist_members(dists: Dists) -> dict[str, tarfile.TarInfo]:
    """The sdist's members by their path inside its one top folder."""
    with tarfile.open(dists.sdist) as tar:
        members = tar.getmembers()
    assert all(m.name.startswith(f"{STEM}/") for m in members)
    return {m.name.removeprefix(f"{STEM}/"): m for m in members}


def wheel_metadata(dists: Dists) -> Message:
    with zipfile.ZipFile(dists.wheel) as whl:
        text = whl.read(f"{STEM}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def repo_files(pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)}


def test_the_files_are_named_after_the_distribution(dists: Dists) -> None:
    assert dists.sdist.name == f"{STEM}.tar.gz"
    assert dists.wheel.name == f"{STEM}-py3-none-any.whl"


def test_the_sdist_has_the_package_the_tests_and_what_they_read(dists: Dists) -> None:
    names = set(sdist_members(dists))
    expected = {"LICENSE", "README.md", "pyproject.toml", "PKG-INFO", "aioserver/py.typed"}
    expected |= repo_files("aioserver/**/*.py") | repo_files("tests/*.py")
    expected |= {"docs/benchmarks.md", "docs/bench-results.json"}  # README links them
    expected |= {"scripts/serve", "scripts/test", "scripts/_venv.sh", "scripts/bench"}
    expected |= repo_files("scripts/benchmark/*.py")
    expected |= {"docs/bench-instructions.json"}
    # tests/test_bench.py reads these and runs scripts/bench, which builds the C ones.
    expected |= repo_files("scripts/bench_*.py") | repo_files("scripts/bench_*.c")
    assert expected <= names, sorted(expected - names)
    assert {"aioserver/__init__.py", "tests/test_bench.py", "scripts/bench_load.c"} <= names


def test_the_sdist_has_every_file_scripts_bench_starts(dists: Dists) -> None:
    names = set(sdist_members(dists))
    sources = [ROOT / "scripts" / "bench", *(ROOT / "scripts" / "benchmark").glob("*.py")]
    started = {name for path in sources for name in re.findall(r"\bbench_\w+", path.read_text())}
    assert started, "scripts/bench names none of its servers any more"
    for stem in started:
        assert {f"scripts/{stem}.c", f"scripts/{stem}.py"} & names, stem


def test_the_sdist_keeps_the_scripts_executable(dists: Dists) -> None:
    members = sdist_members(dists)
    for script in ("scripts/serve", "scripts/test", "scripts/bench"):
        assert members[script].mode & 0o111, f"{script} lost its executable bit"


def test_the_sdist_and_the_wheel_carry_no_work_tree_litter(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(sdist_members(dists)) | set(whl.namelist())
    assert not {name for name in names if LITTER.search(name)}


def test_the_sdist_metadata_names_the_distribution(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as tar:
        file = tar.extractfile(f"{STEM}/PKG-INFO")
        assert file is not None
        pkg_info = email.parser.Parser().parsestr(file.read().decode())
    assert pkg_info["Name"] == DIST_NAME
    assert pkg_info["License-Expression"] == "MIT"


def test_the_wheel_has_the_package_and_the_license_only(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(whl.namelist())
        license_text = whl.read(f"{STEM}.dist-info/licenses/LICENSE").decode()
    package = {name for name in names if name.startswith("aioserver/")}
    assert package == repo_files("aioserver/**/*.py") | {"aioserver/py.typed"}
    assert {name.split("/", 1)[0] for name in names} == {"aioserver", f"{STEM}.dist-info"}
    assert license_text == (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) the aioserver authors" in license_text


def test_the_wheel_has_the_console_script_and_the_pytest_plugin(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        entry_points = whl.read(f"{STEM}.dist-info/entry_points.txt").decode()
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == {"aioserver": "aioserver.cli:main"}
    assert dict(parser["pytest11"]) == {"aioserver": "aioserver.pytest_plugin"}


def test_the_wheel_metadata_is_ready_to_publish(dists: Dists) -> None:
    metadata = wheel_metadata(dists)
    assert metadata["Name"] == DIST_NAME
    assert metadata["Version"] == aioserver.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == ">=3.11"
    missing = CLASSIFIERS - set(metadata.get_all("Classifier") or [])
    assert not missing, sorted(missing)
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Issues"} <= set(urls), urls
    assert all(url.startswith("https://") for url in urls.values()), urls
    # The README is the long description, rendered on PyPI.
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert str(metadata.get_payload()).startswith("# aioserver\n")


def test_the_sdists_tests_run_from_the_unpacked_sdist(dists: Dists, tmp_path: Path) -> None:
    """The sdist, unpacked with nothing added, runs its own tests with this Python."""
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    tree = tmp_path / "unpacked" / STEM
    before = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    # Only the unpacked tree: not this run's coverage, options or plugins.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COV_CORE_", "COVERAGE_", "PYTEST_"))
    }
    env |= {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )

    where = run("-c", "import aioserver.pytest_plugin as p; print(p.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(tree), where.stdout

    pytest_args = ["-m", "pytest", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")]
    collected = run(*pytest_args, "-q", "--collect-only", "tests")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]

    proc = run(*pytest_args, "-q", *SUBSET)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", proc.stdout), output
    assert not re.search(r"\b(failed|errors?)\b", proc.stdout.splitlines()[-1]), output

    after = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    assert after == before, "running the tests wrote into the unpacked sdist"


README = ROOT / "README.md"
INSTALL_TIMEOUT_S = 300  # a new venv and pip installs from the index or its cache
EXAMPLES_TIMEOUT_S = 120
# What an example module of the README may import besides the standard library.
EXAMPLE_PACKAGES = {"aioserver", "pytest", "redis"}


def readme_test_modules() -> list[str]:
    """Every test module of the README's "Use it in your tests" section."""
    section = README.read_text().split("## Use it in your tests", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_test_modules_pass_in_an_empty_project_that_installs_only_the_wheel(
    dists: Dists, tmp_path: Path
) -> None:
    """Each module of "Use it in your tests", copied into an empty project whose
    new environment has only the wheel with its pytest extra (and redis-py for the
    module that imports redis), passes there."""
    modules = readme_test_modules()
    assert modules, "expected the README's test modules"
    imported = {
        name.split(".")[0]
        for module in modules
        for name in re.findall(r"^(?:from|import) (\w[\w.]*)", module, re.M)
    }
    assert imported - EXAMPLE_PACKAGES <= set(sys.stdlib_module_names), imported
    if "redis" in imported and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's)")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COV_CORE_", "COVERAGE_", "PYTEST_", "VIRTUAL_ENV"))
    }
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    install = [f"{dists.wheel}[pytest]", *(["redis"] if "redis" in imported else [])]
    proc = subprocess.run(
        [python, "-m", "pip", "install", "-q", *install],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    project = tmp_path / "project"
    project.mkdir()
    for number, module in enumerate(modules, 1):
        (project / f"test_readme_{number}.py").write_text(module)
    proc = subprocess.run(
        [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLES_TIMEOUT_S,
        check=False,
    )
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", proc.stdout), output
    assert not re.search(r"\b(failed|errors?|skipped|warnings?)\b", proc.stdout), output
