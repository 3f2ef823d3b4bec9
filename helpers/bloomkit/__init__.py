"""bloomkit: the shared helpers behind the notebooks and recipes."""
from . import dsops as _dsops

__version__ = "0.1.0"

# DeepSpeed's JIT-built C++ ops go into this environment (one build per env; see dsops).
_dsops.use_env_local_build_dir()
