"""requirements.txt and environment.yml install exactly the same pip set; the installed
environment is the pinned one."""
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for ln in lines:
        ln = ln.split("#", 1)[0].strip()
        if ln:
            name, _, ver = ln.partition("==")
            assert ver, f"unpinned requirement {ln!r}"
            out[name.strip().lower()] = ver.strip()
    return out


def _env_pip(path):
    env = yaml.safe_load(path.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip[0]["pip"]


def test_conda_env_equals_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = _pins(_env_pip(ROOT / "environment.yml"))
    assert req == env


def test_conda_env_brings_libaio():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "libaio" in env["dependencies"] and "conda-forge" in env["channels"]


def test_installed_versions_are_the_pinned_ones():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name, ver in req.items():
        got = metadata.version(name)
        assert got.split("+")[0] == ver, f"{name}: installed {got}, pinned {ver}"
