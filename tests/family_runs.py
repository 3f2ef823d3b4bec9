"""Run one recipe's ``main`` for several models in one process (one import of torch and
DeepSpeed, one process group), each with ``--verify`` and its own ``--json_out``.

    python tests/family_runs.py OUT_DIR RECIPE.py MODEL [MODEL ...] -- RECIPE_FLAGS...
    deepspeed --num_accelerators 2 tests/family_runs.py OUT_DIR recipes/ds_inference.py ...

Writes ``OUT_DIR/MODEL.json`` per model; a model whose run fails leaves ``OUT_DIR/MODEL.err``
(its one-line error or exit code) and the others still run."""
import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
sep = args.index("--")
out_dir, recipe, names, flags = Path(args[0]), args[1], args[2:sep], args[sep + 1:]
main = runpy.run_path(recipe)["main"]
for name in names:
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(["--name", name, "--verify", "--json_out", str(out_dir / f"{name}.json"), *flags])
        except SystemExit as exc:
            code = exc.code or 0
    if code and os.environ.get("RANK", "0") == "0":
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error")]
        (out_dir / f"{name}.err").write_text((lines or [f"exit {code}"])[-1] + "\n")
