"""Every ``Example:`` in the package's docstrings runs and prints what it says (doctest), so
the examples a reader copies from ``help()`` cannot drift from the code."""
import doctest
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "helpers" / "bloomkit"
WITH_EXAMPLES = sorted(p for p in PKG.rglob("*.py") if ">>>" in p.read_text())


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_entry_points_have_examples():
    names = {module_name(p) for p in WITH_EXAMPLES}
    assert {"bloomkit.cli", "bloomkit.strategies.accel"} <= names, names


@pytest.mark.parametrize("path", WITH_EXAMPLES, ids=module_name)
def test_docstring_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name(path))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed, result
