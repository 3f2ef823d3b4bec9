"""Run the notebooks headless (papermill), the way ``make run`` and the tests do.

* Each notebook has one cell tagged ``parameters``; papermill injects overrides after it.
  Papermill only *warns* about names the notebook does not define, which lets a typo in a
  CI job silently run the default; :func:`check_parameters` makes that an error.
* Profiles (``profiles/<name>.yaml``) hold the overrides for one target machine:
  ``common`` (every notebook), and ``notebooks: {<stem>: {...}}`` for one notebook.
* Each notebook writes its result records to ``RESULTS_PATH`` (JSON lines); the runner
  passes one per notebook and gathers them into ``results.jsonl``.

Command line: ``python -m bloomkit.notebooks --profile cpu-tiny --out runs/cpu-tiny``.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .errors import UserError, cli_entry


def repo_root() -> Path:
    """The checkout whose notebooks and profiles the runner uses: the one holding this package
    (``pip install -e .``, as ``make`` does), else the current directory (a ``pip install .``
    run from inside a checkout)."""
    here = Path(__file__).resolve().parents[2]
    if (here / "notebooks").is_dir() or not (Path.cwd() / "notebooks").is_dir():
        return here
    return Path.cwd()


ROOT = repo_root()
NOTEBOOK_DIR = ROOT / "notebooks"
PROFILE_DIR = ROOT / "profiles"
KERNEL = "bloomkit"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameters_of(path: str | Path) -> dict:
    """Names and default values assigned in the notebook's ``parameters`` cell."""
    nb = json.loads(Path(path).read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            out = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            out[t.id] = ast.literal_eval(node.value)
            return out
    raise UserError(f"{path} has no cell tagged 'parameters'; tag one in Jupyter "
                    "(View > Cell toolbar > Tags)")


def check_parameters(path: str | Path, params: dict) -> None:
    known = parameters_of(path)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(f"{Path(path).name} has no parameter(s) {', '.join(unknown)}; "
                        f"its parameters are: {', '.join(sorted(known))}")


def load_profile(name: str) -> dict:
    """``{"common": {...}, "notebooks": {stem: {...}}}`` from ``profiles/<name>.yaml``."""
    import yaml

    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise UserError(f"unknown profile {name!r}; use one of: {have}")
    data = yaml.safe_load(path.read_text()) or {}
    extra = set(data) - {"common", "notebooks", "description", "requires"}
    if extra:
        raise UserError(f"{path.name}: unknown top-level keys {sorted(extra)}; use common, "
                        "notebooks, description, requires")
    return {"common": data.get("common") or {}, "notebooks": data.get("notebooks") or {},
            "description": data.get("description", ""), "requires": data.get("requires") or {},
            "name": name}


def check_machine(profile: dict) -> str:
    """Can this machine run ``profile``?  Its ``requires`` section names what it needs
    (``device: cuda``, ``gpus``, ``gpu_memory`` per GPU, ``ram``) and ``minutes``, how long it
    takes on its target machine.  A profile this machine cannot run stops here, before any
    model is built, in one line naming a profile that suits; else returns the line to print
    before starting (its expected duration)."""
    from accelerate.utils import convert_file_size_to_int

    from . import sysinfo

    req, name = profile.get("requires") or {}, profile.get("name", "?")
    here = "run `make run PROFILE=cpu-tiny` here (cpu-bench for timings)"
    if req.get("device") == "cuda" or req.get("gpus"):
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = int(req.get("gpus", 1))
        if have < need:
            raise UserError(f"profile {name} needs {need} CUDA GPU(s) and this machine has "
                            f"{have or 'none'}; {here}, or run {name} on a machine with its GPUs")
        if req.get("gpu_memory"):
            want = convert_file_size_to_int(str(req["gpu_memory"]))
            small = [i for i in range(need) if torch.cuda.get_device_properties(i).total_memory < 0.9 * want]
            if small:
                raise UserError(f"profile {name} needs {req['gpu_memory']} per GPU; GPU {small[0]} has "
                                f"{torch.cuda.get_device_properties(small[0]).total_memory / 2**30:.0f} "
                                "GiB: pick a profile for this GPU or lower its model")
    if req.get("ram"):
        want = convert_file_size_to_int(str(req["ram"]))
        have = sysinfo.hardware()["ram_bytes"]
        if have < 0.9 * want:
            raise UserError(f"profile {name} needs {req['ram']} of RAM and this machine has "
                            f"{have / 2**30:.0f} GiB; {here}")
    minutes = req.get("minutes")
    return (f"profile {name}: about {minutes} minutes on its target machine ({profile['description'].split(' - ')[0]})"
            if minutes else f"profile {name}")


def profile_parameters(profile: dict, nb_path: Path) -> dict:
    params = dict(profile["common"])
    params.update(profile["notebooks"].get(nb_path.stem, {}) or {})
    return params


def kernel_name() -> str:
    """The project's kernel when installed (``make setup`` does), else the default one."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


def execute(path: str | Path, out: str | Path, parameters: dict | None = None,
            prepare_only: bool = False, timeout: int | None = None) -> Path:
    """Execute notebook ``path`` into ``out`` with ``parameters`` (checked first)."""
    import papermill as pm
    from traitlets.config import Config

    params = dict(parameters or {})
    check_parameters(path, params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the kernel inherits this environment: the recipes' thread settings, unless already set
    from .launch import thread_env

    added = {k: v for k, v in thread_env(1).items() if k not in os.environ}
    os.environ.update(added)
    # IPC sockets, not TCP on loopback: the kernel then has nothing to warn about in the terminal.
    # Each execution gets sockets of its own: jupyter_client's default names them "kernel-ipc-N"
    # in the working directory, where two notebooks run at once would pick the same N.
    sockets = tempfile.mkdtemp(prefix="bloomkit-kernel-")
    try:
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=kernel_name(),
                            cwd=str(Path(path).parent), progress_bar=False,
                            prepare_only=prepare_only, execution_timeout=timeout,
                            config=Config({"KernelManager": {"transport": "ipc",
                                                             "ip": os.path.join(sockets, "kernel")}}))
    finally:
        for k in added:
            os.environ.pop(k, None)
        shutil.rmtree(sockets, ignore_errors=True)
    return out


def to_html(nb_path: Path) -> Path:
    """The executed notebook as HTML, as a learner reads it: the named claims it recorded
    (:mod:`bloomkit.claims`, for the tests) are left out."""
    import nbformat
    from nbconvert import HTMLExporter

    from .claims import MIME

    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if MIME not in o.get("data", {})]
    body, _ = HTMLExporter().from_notebook_node(nb)
    html = nb_path.with_suffix(".html")
    html.write_text(body)
    return html


def run_profile(profile_name: str, out_dir: str | Path, only: list[str] | None = None) -> list[dict]:
    """Execute every notebook with one profile; returns the gathered result records.

    Prints one line per notebook when it finishes (its time, its records); on a terminal a bar
    below them counts the notebooks and the running one's elapsed seconds, redrawn every second
    (:mod:`bloomkit.progress`; nothing of it in a redirected log or in CI)."""
    from . import progress
    from .results import read_records, write_json

    profile = load_profile(profile_name)
    print(check_machine(profile), flush=True)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [p for p in notebooks() if not only or any(p.stem.startswith(o) for o in only)]
    for p in paths:  # check every notebook's parameters before spending time on any
        check_parameters(p, profile_parameters(profile, p))
    records, summary = [], []
    with progress.bar(total=len(paths), desc=f"notebooks ({profile_name})",
                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") as done:
        for p in paths:
            res = out_dir / f"{p.stem}.jsonl"
            res.unlink(missing_ok=True)
            params = profile_parameters(profile, p)
            params["RESULTS_PATH"] = str(res)
            t0 = time.perf_counter()
            with progress.ticking(done, note=lambda: f"{p.name} {time.perf_counter() - t0:.0f} s"):
                executed = execute(p, out_dir / p.name, params)
                to_html(executed)
            got = read_records(res) if res.exists() else []
            records.extend(got)
            summary.append({"notebook": p.name, "seconds": round(time.perf_counter() - t0, 1),
                            "records": len(got)})
            done.set_postfix_str("", refresh=False)
            progress.echo(f"  {p.name}: {summary[-1]['seconds']} s, {len(got)} result records")
            done.update(1)
    (out_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json(out_dir / "summary.json", {"profile": profile_name, "notebooks": summary})
    from .measure.report import write_report

    print(f"  report: {write_report(out_dir)['html']}", flush=True)
    return records


def profile_lines() -> list[str]:
    """One line per profile in ``profiles/``: its name and the first sentence of its description."""
    lines = []
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            desc = str(load_profile(path.stem)["description"])
        except UserError as exc:
            desc = str(exc)
        first = " ".join(desc.split()).split(". ")[0].rstrip(".")
        lines.extend(textwrap.wrap(first, 96, initial_indent=f"  {path.stem:<18} ",
                                   subsequent_indent=" " * 21))
    return lines or [f"  (none: no profiles/*.yaml under {ROOT}; run from a checkout of the repository)"]


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bloomkit.notebooks`` (``bloomkit-notebooks``); its help
    lists the profiles.

    Example:
        >>> parser().parse_args(["--only", "01", "02"]).only
        ['01', '02']
    """
    from .cli import Parser

    p = Parser(prog="python -m bloomkit.notebooks",
               description="Execute the notebooks headless (papermill) with a profile: the executed\n"
                           "notebooks, their HTML, results.jsonl and a report go under --out.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="profiles (profiles/<name>.yaml; the model and sizes each notebook runs, "
                      "hence its time and memory):\n" + "\n".join(profile_lines()))
    p.add_argument("--profile", default="cpu-tiny", metavar="NAME",
                   help="which profiles/<NAME>.yaml to run, listed below; a profile this machine "
                        "cannot run (GPUs, memory) stops before any model is built "
                        "(default: %(default)s, the CI profile)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the executed notebooks and results go (default: runs/<profile>)")
    p.add_argument("--only", nargs="*", metavar="PREFIX",
                   help="run only the notebooks whose names start with these, e.g. 01 02 "
                        "(default: every notebook)")
    return p


@cli_entry
def main(argv=None):
    """``python -m bloomkit.notebooks`` and the ``bloomkit-notebooks`` command (argv: ``sys.argv``)."""
    p = parser()
    args = p.parse_args(argv)
    out = args.out or f"runs/{args.profile}"
    run_profile(args.profile, out, args.only)
    print(f"results: {out}/results.jsonl; report: {out}/report.md (+ .html, .png); "
          f"executed notebooks and HTML in {out}/")


if __name__ == "__main__":
    sys.exit(main())
