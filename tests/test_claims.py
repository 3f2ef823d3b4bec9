"""Named claims travel inside an executed notebook and are read back by name (bloomkit.claims),
invisible in what a learner reads (the notebook's text outputs and its HTML export)."""
import json

import nbformat
import pytest

from bloomkit import claims, notebooks


def test_a_claim_recorded_in_a_notebook_is_read_back(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("RESULTS_PATH = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from bloomkit import claims\n"
        "from bloomkit.measure import compare\n"
        "c = compare.compare_times([1.0] * 5, [2.0, 2.1, 1.9, 2.0, 2.2])\n"
        "claims.record('speedup', c.speedup, spread=(1 / c.high, 1 / c.low), unit='x', verdict=c.verdict)\n"
        "print(c.sentence('compiled', 'eager'))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "claim.ipynb"
    nbformat.write(nb, src)
    out = notebooks.execute(src, tmp_path / "out.ipynb", {})
    got = claims.read(out)
    assert set(got) == {"speedup"}
    assert got["speedup"]["value"] == 2.0 and got["speedup"]["verdict"] == "faster"
    assert got["speedup"]["spread"] == pytest.approx([1.9, 2.2]) and got["speedup"]["unit"] == "x"
    outputs = json.loads(out.read_text())["cells"][-1]["outputs"]
    shown = [o for o in outputs if "text/plain" in o.get("data", {}) or o["output_type"] == "stream"]
    assert ["".join(o["text"]) for o in shown] == [
        "compiled is 2.00x faster than eager (1.90x-2.20x over 5 interleaved pairs)\n"]
    assert claims.MIME not in notebooks.to_html(out).read_text()


def test_outside_a_notebook_a_claim_is_only_returned():
    assert claims.record("x", 1, unit="GB") == {"name": "x", "value": 1, "spread": None, "unit": "GB"}
