"""The README stays short and every page it links exists, with every relative link in it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "models" / "trained" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_short_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    quick = text.split("## Quickstart", 1)[1].split("```")[1]
    assert [ln.split("#")[0].strip() for ln in quick.splitlines() if ln.strip() and ln.strip() != "bash"] \
        == ["make run", "make test"]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_recipe_in_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    for name in set(re.findall(r"recipes/(\w+\.py)", text)):
        assert (ROOT / "recipes" / name).exists(), name


def test_serving_table_rows_name_recorded_parts():
    """Each row of docs/serving.md's table of peers names a part that benchmarks/results/serve-peers-cpu.json
    holds (a row cannot outlive its record, nor cite one never measured)."""
    import json

    text = (ROOT / "docs" / "serving.md").read_text()
    table = text.split("| part (key in the file) |", 1)[1].split("\n\n", 1)[0]
    keys = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    recorded = json.loads((ROOT / "benchmarks" / "results" / "serve-peers-cpu.json").read_text())["peers"]
    assert len(keys) >= 5 and not set(keys) - set(recorded), set(keys) - set(recorded)
