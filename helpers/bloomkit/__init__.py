"""bloomkit: the shared helpers behind the notebooks and recipes.

The package is grouped by concern; imports only go down this list, and no two modules
import each other (``tests/test_layout.py`` checks both):

* entry points — :mod:`.notebooks` (``make run``), :mod:`.microbench` (the benchmarks),
  :mod:`.train` (the shipped ``trained`` model);
* :mod:`.strategies` — Accelerate, DeepSpeed tensor parallelism, ZeRO-Inference, BLOOM's extras;
* :mod:`.measure` — the harness, quality checks, planner, roofline, report;
* the ground — :mod:`.cli` (recipes' shared flags), :mod:`.models` (embedded models, any
  model name to a directory), :mod:`.arch` (shapes from any config), :mod:`.memory`,
  :mod:`.prompts`, :mod:`.results`, :mod:`.dist` (ranks), :mod:`.launch`, :mod:`.dsops`,
  :mod:`.dtypes`, :mod:`.sysinfo`, :mod:`.errors`, :mod:`.progress` (bars where a person watches).
"""
from . import dsops as _dsops

__version__ = "0.1.0"

# DeepSpeed's JIT-built C++ ops go into this environment (one build per env; see dsops).
_dsops.use_env_local_build_dir()
