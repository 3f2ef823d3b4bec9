"""bloomkit: the shared helpers behind the notebooks and recipes."""
__version__ = "0.1.0"
