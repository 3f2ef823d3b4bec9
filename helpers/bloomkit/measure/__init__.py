"""Measuring: the one harness (the blog's method), result records' quality checks, the
memory planner, rooflines and the report.  A strategy reaches here only through the
``load`` function it hands to :func:`bloomkit.measure.bench.run_variant`."""
