"""The package's architecture, checked: imports go down the floors, no two modules import
each other, and BLOOM's specifics stay in one module."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "helpers" / "bloomkit"
ENTRY = {"notebooks", "microbench", "train"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "bloomkit"


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at top level or inside functions)."""
    names = {module_name(p) for p in PKG.rglob("*.py")}
    graph = {}
    for p in PKG.rglob("*.py"):
        me = module_name(p)
        pkg = me.split(".")[:-1] if p.name != "__init__.py" else me.split(".")
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{mod}.{a.name}".strip(".")
                    out.add(full if full in names else mod)
        graph[me] = {m for m in out if m in names and m != me}
    return graph


def floor(mod: str) -> int:
    if mod in ENTRY:
        return 3
    if mod.startswith("serve"):   # the server stands on strategies, measure and the ground
        return 3
    if mod.startswith("strategies"):
        return 2
    if mod.startswith("measure") or mod == "claims":   # a claim records a measurement (and its comparison)
        return 1
    return 0


def test_no_two_modules_import_each_other():
    g = imports()
    pairs = sorted({tuple(sorted((a, b))) for a in g for b in g[a] if a in g.get(b, ())})
    assert not pairs, f"modules importing each other: {pairs}"


def test_imports_go_down_the_floors():
    """ground <- measure <- strategies <- serve and entry points; __init__ files and cli.prepare's
    users aside, nothing imports a floor above its own."""
    g = imports()
    up = [(a, b) for a in g for b in g[a]
          if not a.endswith("__init__") and floor(b) > floor(a) and b not in ("measure", "strategies")]
    assert not up, f"imports that go up a floor: {up}"


def test_bloom_specifics_live_in_one_module():
    """BLOOM's module names, its ALiBi builder and DeepSpeed's fused BLOOM block are named only
    in strategies/bloom.py (models.py generates the embedded BLOOM, so it names its config)."""
    pat = re.compile(r"transformer\.h\.|\.transformer\.|build_alibi|def \w*alibi|DeepSpeedBloom|"
                     r"BloomBlock|self_attention")
    hits = {str(p.relative_to(PKG)): pat.findall(p.read_text()) for p in PKG.rglob("*.py")
            if p.name not in ("bloom.py", "models.py")}
    hits = {k: v for k, v in hits.items() if v}
    assert not hits, f"BLOOM-only code outside strategies/bloom.py: {hits}"
