"""envs/*.yaml must pin exactly what pyproject.toml pins, so conda jobs run the tested versions."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    pins = {}
    for req in requirements:
        if "==" in req:
            name, version = req.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_env_matches_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = _pins(project["dependencies"])
    assert expected, "pyproject pins nothing"
    unpinned = [r for r in project["dependencies"] if "==" not in r]
    assert not unpinned, f"pyproject dependencies without an exact pin: {unpinned}"
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs, "no conda environments under envs/"
    for env in envs:
        deps = yaml.safe_load(env.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        got = _pins(pip)
        assert got == expected, f"{env.name} pins differ from pyproject: {set(got.items()) ^ set(expected.items())}"
