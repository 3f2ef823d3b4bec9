"""The installable package: what the code imports is pinned, what pyproject.toml declares holds
the pins, its console scripts exist, a fresh ``pip install ".[serve]"`` works, and every
command's ``--help`` teaches (each flag's default and what it does)."""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, assert_one_line_error, run_script

SOURCES = [ROOT / "helpers" / "bloomkit", ROOT / "recipes", ROOT / "benchmarks", ROOT / "tests"]
# Imports that may be missing on purpose, each guarded by ``except ImportError`` where it is
# imported, with the reason it is not pinned.  (Empty today: every import is pinned.)
OPTIONAL = {}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------- what the code imports

def _first_party() -> set[str]:
    """Names the tree itself provides: the package, the recipes, and the test and benchmark
    directories' own modules (``conftest``, ``nbtools``, ``notebook_checks``, ...)."""
    names = {"bloomkit", "recipes"}
    for d in SOURCES[1:]:
        names |= {p.stem for p in d.glob("*.py")} | {p.name for p in d.iterdir() if (p / "__init__.py").exists()}
    return names


def imported_names(files) -> dict[str, set[str]]:
    """Top-level module name -> the files importing it (at any level: inside functions too)."""
    out: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                out.setdefault(m.split(".")[0], set()).add(str(Path(path).relative_to(ROOT)))
    return out


@functools.lru_cache
def third_party(dirs=tuple(SOURCES)) -> dict[str, set[str]]:
    """Distribution (canonical name) -> the files that import it, for every non-stdlib,
    non-first-party import under ``dirs``."""
    files = [p for d in dirs for p in sorted(Path(d).rglob("*.py")) if "__pycache__" not in p.parts]
    mine, dists = _first_party(), metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    unknown = {}
    for name, where in imported_names(files).items():
        if name in sys.stdlib_module_names or name in mine or name == "__future__":
            continue
        if name not in dists:
            unknown[name] = sorted(where)
            continue
        for dist in dists[name]:
            out.setdefault(canonicalize_name(dist), set()).update(where)
    missing = {k: v for k, v in unknown.items() if k not in OPTIONAL}
    assert not missing, f"imported but installed by no distribution (pin it, or list it in OPTIONAL): {missing}"
    return out


def _pins(lines) -> dict[str, str]:
    out = {}
    for ln in lines:
        ln = ln.split("#", 1)[0].strip()
        if ln:
            name, _, ver = ln.partition("==")
            out[canonicalize_name(name)] = ver.strip()
    return out


def requirement_pins() -> dict[str, str]:
    return _pins((ROOT / "requirements.txt").read_text().splitlines())


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return _pins(pip[0])


def test_every_imported_package_is_pinned_alike():
    """Every third-party module that the package, recipes, benchmarks or tests import is pinned
    in requirements.txt and environment.yml, at the same version, which is the installed one."""
    req, env = requirement_pins(), environment_pins()
    used = third_party()
    problems = []
    for dist, where in sorted(used.items()):
        first = sorted(where)[0]
        if dist not in req:
            problems.append(f"{dist} (imported by {first}) is not in requirements.txt")
        if dist not in env:
            problems.append(f"{dist} (imported by {first}) is not in environment.yml")
        if dist in req and dist in env and req[dist] != env[dist]:
            problems.append(f"{dist}: requirements.txt pins {req[dist]}, environment.yml {env[dist]}")
        if dist in req and metadata.version(dist).split("+")[0] != req[dist]:
            problems.append(f"{dist}: installed {metadata.version(dist)}, pinned {req[dist]}")
    assert not problems, "; ".join(problems) + " (pin `.venv/bin/pip list`'s version in both files)"


def test_the_known_direct_imports_are_seen():
    """The scan finds what the issue listed as imported but unpinned (a scan seeing nothing
    would pass the test above)."""
    used = third_party()
    for dist in ("httpx", "filelock", "packaging", "mistune", "jupyter-client", "ipython", "pillow",
                 "torch", "fastapi"):
        assert dist in used, dist


# ---------------------------------------------------------------------------- pyproject.toml

def declared() -> dict[str, list[Requirement]]:
    """``""`` (the core dependencies) and each extra -> its requirements on other projects."""
    proj = PYPROJECT["project"]
    groups = {"": proj["dependencies"], **proj["optional-dependencies"]}
    return {g: [Requirement(r) for r in reqs] for g, reqs in groups.items()}


def closure(*groups: str) -> set[str]:
    """The distributions a ``pip install bloomkit[groups]`` asks for (extras naming extras followed)."""
    got, todo, seen = set(), ["", *groups], set()
    decl = declared()
    while todo:
        g = todo.pop()
        if g in seen:
            continue
        seen.add(g)
        for r in decl[g]:
            if canonicalize_name(r.name) == "bloomkit":
                todo.extend(r.extras)
            else:
                got.add(canonicalize_name(r.name))
    return got


def test_declared_ranges_hold_the_pins():
    """Every declared requirement is pinned in requirements.txt, and the pin lies in its range."""
    req = requirement_pins()
    bad = []
    for group, reqs in declared().items():
        for r in reqs:
            name = canonicalize_name(r.name)
            if name == "bloomkit":
                assert set(r.extras) <= set(declared()), r
                continue
            if name not in req:
                bad.append(f"{r} ({group or 'dependencies'}) is not pinned in requirements.txt")
            elif not r.specifier.contains(req[name]) or not str(r.specifier):
                bad.append(f"{r} ({group or 'dependencies'}) excludes the pin {req[name]}")
    assert not bad, bad


def test_declared_dependencies_cover_the_imports():
    """``pip install ".[all]"`` brings everything the package imports; ``.[test]`` also what the
    tests, recipes and benchmarks import; the core set, what every module needs at import."""
    package = set(third_party((ROOT / "helpers" / "bloomkit",)))
    assert package - closure("all") == set(), "declare these in pyproject.toml"
    rest = set(third_party())
    assert rest - closure("test") == set(), "add these to the test extra"
    assert {"torch", "transformers", "accelerate"} <= closure()


def test_console_scripts_are_the_modules_users_run():
    """Every ``python -m bloomkit...`` the docs, Makefile and notebooks tell a user to run has a
    console script, and each script is a function callable with no arguments."""
    import importlib
    import inspect

    scripts = PYPROJECT["project"]["scripts"]
    targets = {v.split(":")[0] for v in scripts.values()}
    texts = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "notebooks").glob("*.ipynb"), ROOT / "benchmarks" / "README.md"]
    told = {m for p in texts for m in re.findall(r"-m (bloomkit(?:\.\w+)+)", p.read_text())}
    assert told and told <= targets, f"no console script for: {sorted(told - targets)}"
    for name, target in scripts.items():
        assert name.startswith("bloomkit-"), name
        mod, _, func = target.partition(":")
        fn = getattr(importlib.import_module(mod), func)
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not required, f"{name}: {target} needs arguments {required}"


# ---------------------------------------------------------------------------- helps that teach

def flag_helps(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, from argparse's ``--help`` output."""
    out, cur = {}, None
    for ln in text.splitlines():
        m = re.match(r"  (-\w, )?(--\w[\w-]*)(.*)", ln)
        if m:
            cur = m.group(2)
            out[cur] = m.group(3)
        elif cur and ln.startswith(" " * 8):
            out[cur] += " " + ln.strip()
        else:
            cur = None
    out.pop("--help", None)
    return {k: " ".join(v.split()) for k, v in out.items()}


HELPS = {
    "bloomkit.train": ["-m", "bloomkit.train", "--help"],
    "bloomkit.notebooks": ["-m", "bloomkit.notebooks", "--help"],
    "benchmarks/foundation.py": ["benchmarks/foundation.py", "--help"],
    "benchmarks/strategies.py": ["benchmarks/strategies.py", "--help"],
    "benchmarks/speculative.py": ["benchmarks/speculative.py", "--help"],
    "benchmarks/serve.py": ["benchmarks/serve.py", "--help"],
}


@pytest.mark.parametrize("command", sorted(HELPS))
def test_help_gives_every_flags_default_and_what_it_does(command):
    proc = run_script([sys.executable, *HELPS[command]], timeout=120)
    assert proc.returncode == 0, proc.stderr
    helps = flag_helps(proc.stdout)
    assert len(helps) >= 2, proc.stdout
    bare = [f for f, h in helps.items() if len(h.split()) < 6]
    assert not bare, f"{command}: flags that do not say what they do: {bare}"
    no_default = [f for f, h in helps.items() if "default" not in h and "required" not in h]
    assert not no_default, f"{command}: flags that do not give their default: {no_default}"
    if command == "bloomkit.train":
        assert len(helps) >= 16, sorted(helps)       # every flag, none lost from the help
        for flag in ("--batch", "--seq_len", "--hidden", "--layers"):
            assert "memory" in helps[flag] or "parameters" in helps[flag], helps[flag]


def test_notebooks_help_and_unknown_profile_list_the_profiles():
    from bloomkit import notebooks

    names = sorted(p.stem for p in notebooks.PROFILE_DIR.glob("*.yaml"))
    assert "cpu-tiny" in names
    text = notebooks.parser().format_help()
    for name in names:
        assert re.search(rf"^  {re.escape(name)} +\S", text, re.M), (name, text)
    proc = run_script([sys.executable, "-m", "bloomkit.notebooks", "--profile", "nope"], timeout=120)
    line = assert_one_line_error(proc, "unknown profile", *names)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, line


@pytest.mark.parametrize("argv, needle", [
    (["--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["--out", "x", "--minutes", "soon"], "--minutes"),
    ([], "--out"),
    (["--out", "x", "--heads", "3"], "--heads 3 does not divide --hidden 256"),
], ids=["unknown", "not-a-number", "missing-out", "heads"])
def test_train_bad_flag_is_one_line(argv, needle, tmp_path):
    proc = run_script([sys.executable, "-m", "bloomkit.train", *argv], timeout=120, cwd=tmp_path)
    line = assert_one_line_error(proc, needle)
    assert proc.returncode == 2 and proc.stderr.strip() == line and not proc.stdout, proc.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- a fresh install

def _tree_copy(dest: Path) -> Path:
    """The working tree as a clean clone would hold it (tracked and untracked, not ignored)."""
    import shutil

    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _installed_elsewhere(dest: Path) -> Path:
    """A folder of links to everything this environment has installed, except bloomkit itself
    and the ``.pth`` hooks (its editable install among them): the packages a fresh venv can
    resolve ``.[serve]``'s dependencies from, without a network."""
    import sysconfig

    dest.mkdir()
    for key in ("purelib", "platlib"):
        for entry in Path(sysconfig.get_paths()[key]).iterdir():
            low = entry.name.lower()
            if (low.startswith(("bloomkit", "__editable__")) or low.endswith(".pth")
                    or low == "__pycache__" or (dest / entry.name).exists()):
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import bloomkit
names = [m.name for m in pkgutil.walk_packages(bloomkit.__path__, "bloomkit.")]
for name in names:
    importlib.import_module(name)
from importlib import metadata
print(json.dumps({"file": bloomkit.__file__, "modules": names,
                  "requires": metadata.requires("bloomkit"),
                  "scripts": sorted(e.name for e in metadata.entry_points(group="console_scripts")
                                    if e.value.startswith("bloomkit"))}))
"""


def test_fresh_venv_installs_the_package_and_its_commands(tmp_path):
    """``pip install ".[serve]"`` (not editable) from a clean copy into a fresh venv, offline: the
    package is built from the copy and installed into the venv, every declared dependency is
    resolved from the installed ones; then every module imports and each command's ``--help``
    works, with an empty HOME.  (About 10 s: pip builds one pure-Python wheel and links the rest.)"""
    src = _tree_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = _installed_elsewhere(tmp_path / "deps")
    (Path(site) / "bloomkit_test_deps.pth").write_text(f"{deps}\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(home), "PYTHONNOUSERSITE": "1",
           "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LANG": "C.UTF-8"}

    def run(cmd, cwd=tmp_path, timeout=600):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run([str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-compile",
         f"{src}[serve]"])
    run([str(py), "-m", "pip", "check"])
    # every other extra resolves offline too (``test`` names ``all``, which names the others)
    dry = run([str(py), "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
               f"{src}[test]"]).stdout
    assert "Would install bloomkit-0.1.0" in dry, dry[-2000:]
    info = json.loads(run([str(py), "-c", IMPORT_ALL]).stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(Path(site)), info["file"]   # the built copy, not the tree
    on_disk = {str(p.relative_to(ROOT / "helpers").with_suffix("")).replace("/", ".").removesuffix(".__init__")
               for p in (ROOT / "helpers" / "bloomkit").rglob("*.py")} - {"bloomkit"}
    assert set(info["modules"]) == on_disk
    assert len(info["requires"]) == sum(map(len, PYPROJECT["project"]["optional-dependencies"].values())) \
        + len(PYPROJECT["project"]["dependencies"])
    assert info["scripts"] == sorted(PYPROJECT["project"]["scripts"])
    for script in info["scripts"]:
        out = run([str(env_dir / "bin" / script), "--help"], cwd=src, timeout=120).stdout
        assert "usage:" in out and len(out.splitlines()) > 3, out
        if script == "bloomkit-notebooks":           # run from a checkout: its profiles
            assert "cpu-tiny" in out, out
        bad = subprocess.run([str(env_dir / "bin" / script), "--no-such-flag"], capture_output=True,
                             text=True, env=env, cwd=src, timeout=120)
        assert bad.returncode == 2 and not bad.stdout, (script, bad.stdout, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error:"), bad.stderr
