"""The package installs into a researcher's own environment: ranges (no exact pins, no upper Python bound) in
pyproject.toml, one exact point of them in requirements/lock.txt (what `make setup` installs), the tested lower
bounds in requirements/minimum.txt, and every data file of the package in its package-data."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPENDENCIES = [Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]]


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a pip constraints file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def upper_bounds(specifier: SpecifierSet) -> list[str]:
    """The clauses of a specifier that exclude newer releases (==, ===, <, <=, ~=)."""
    return [str(s) for s in specifier if s.operator in ("==", "===", "<", "<=", "~=")]


def test_the_upper_bound_check_sees_pins_and_caps():
    assert upper_bounds(SpecifierSet("==2.14.1")) and upper_bounds(SpecifierSet(">=3.11,<3.12"))
    assert upper_bounds(SpecifierSet("~=1.2")) and not upper_bounds(SpecifierSet(">=2.11,!=2.12.0"))


def test_python_and_dependencies_have_lower_bounds_only():
    assert not upper_bounds(SpecifierSet(PROJECT["requires-python"])), PROJECT["requires-python"]
    for version in ("3.11", "3.12", "3.13"):
        assert version in SpecifierSet(PROJECT["requires-python"])
    for requirement in DEPENDENCIES:
        assert not upper_bounds(requirement.specifier), f"{requirement}: declare a range, pin in requirements/lock.txt"
        assert any(s.operator == ">=" for s in requirement.specifier), f"{requirement}: no tested lower bound"


@pytest.mark.parametrize("constraints", ["lock.txt", "minimum.txt"])
def test_constraint_files_pin_every_dependency_inside_its_range(constraints):
    pins = _pins(ROOT / "requirements" / constraints)
    for requirement in DEPENDENCIES:
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not pinned in requirements/{constraints}"
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


def test_minimum_versions_are_the_declared_lower_bounds():
    pins = _pins(ROOT / "requirements" / "minimum.txt")
    for requirement in DEPENDENCIES:
        (lower,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        pinned = Version(pins[canonicalize_name(requirement.name)])
        assert pinned.release[: len(lower.release)] == lower.release, (str(requirement), str(pinned))


def test_setup_installs_with_the_lock_file():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/lock.txt" in makefile and "-c $(LOCK)" in makefile
    assert not re.search(r"pip install[^\n]*==", makefile), "exact versions belong in requirements/lock.txt"


def test_every_data_file_of_the_package_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sqaudio"]
    package = ROOT / "sqaudio"
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    shipped = {p for g in globs for p in package.glob(g)}
    assert data and not data - shipped, sorted(str(p.relative_to(package)) for p in data - shipped)
