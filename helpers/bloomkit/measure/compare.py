"""One way to compare two measurements, with their spread, before a sentence calls one faster.

A shared CPU drifts 10-20 % within minutes, so two variants timed minutes apart differ by the
drift as much as by themselves.  The rule used everywhere in this project:

* the two variants are timed **interleaved** (A, B, A, B, ...: :func:`interleaved`), so each
  pair of samples saw the same machine;
* a verdict needs at least :data:`MIN_PAIRS` pairs; the ratio reported is the median of the
  per-pair ratios, and its spread is their range (min to max);
* "faster" or "slower" only when that whole range lies on one side of 1; otherwise the
  sentence says **no measurable difference**.

Values that are not timings (perplexity, agreement) compare by the evaluation's own resolution:
a difference below it is "the same" (:func:`compare_values`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

MIN_PAIRS = 5
FASTER, SLOWER, SAME, TOO_FEW = "faster", "slower", "no measurable difference", "too few samples"


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: ``ratio`` = time of a ÷ time of b (below 1: a is faster)."""

    ratio: float        # median of the per-pair ratios
    low: float          # the smallest per-pair ratio
    high: float         # the largest
    pairs: int
    verdict: str        # FASTER / SLOWER / SAME / TOO_FEW, said of ``a``

    @property
    def speedup(self) -> float:
        """How many times faster ``a`` is than ``b`` (b's time ÷ a's time)."""
        return 1.0 / self.ratio

    def sentence(self, a: str = "A", b: str = "B") -> str:
        """The sentence a lesson prints, e.g. "compiled is 1.42x faster than eager (1.31x-1.55x
        over 5 interleaved pairs)"."""
        spread = f"{1 / self.high:.2f}x-{1 / self.low:.2f}x" if self.ratio < 1 else \
            f"{self.low:.2f}x-{self.high:.2f}x"
        over = f"over {self.pairs} interleaved pair{'s' if self.pairs != 1 else ''}"
        if self.verdict == FASTER:
            return f"{a} is {self.speedup:.2f}x faster than {b} ({spread} {over})"
        if self.verdict == SLOWER:
            return f"{a} is {self.ratio:.2f}x slower than {b} ({spread} {over})"
        if self.verdict == SAME:
            return (f"no measurable difference between {a} and {b} (time ratio {self.low:.2f}-"
                    f"{self.high:.2f} {over}, which includes 1)")
        return (f"{a} against {b}: {self.pairs} pair(s) are too few for a verdict (the rule needs "
                f"{MIN_PAIRS}); time ratio {self.ratio:.2f}")


def compare_times(a: Sequence[float], b: Sequence[float], min_pairs: int = MIN_PAIRS) -> Comparison:
    """Compare interleaved timings of two variants (``a[i]`` and ``b[i]`` measured side by side).

    Args:
        a: seconds (or ms: any unit, the same for both) of variant A, one per cycle.
        b: the same for variant B, in the same order.
        min_pairs: fewer pairs than this give the verdict ``too few samples``.

    Example:
        >>> c = compare_times([1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.2, 2.0])
        >>> c.verdict, round(c.speedup, 2)
        ('faster', 2.0)
        >>> compare_times([1.0, 1.2, 0.9, 1.1, 1.0], [1.1, 1.0, 1.0, 1.0, 1.05]).verdict
        'no measurable difference'
    """
    if len(a) != len(b):
        raise ValueError(f"interleaved samples come in pairs: got {len(a)} and {len(b)}")
    if not a or any(x <= 0 for x in [*a, *b]):
        raise ValueError("timings must be positive, at least one pair")
    ratios = [x / y for x, y in zip(a, b)]
    low, high = min(ratios), max(ratios)
    if len(ratios) < min_pairs:
        verdict = TOO_FEW
    elif high < 1:
        verdict = FASTER
    elif low > 1:
        verdict = SLOWER
    else:
        verdict = SAME
    return Comparison(statistics.median(ratios), low, high, len(ratios), verdict)


def compare_values(a: float, b: float, resolution: float) -> str:
    """``"lower"``, ``"higher"`` or ``"the same"`` for ``a`` against ``b``: a difference smaller
    than ``resolution`` (the evaluation's own, e.g. perplexity's rounding or its bootstrap
    spread) is not a difference.

    Example:
        >>> compare_values(70.01, 70.05, resolution=0.1), compare_values(72.0, 70.0, resolution=0.1)
        ('the same', 'higher')
    """
    if a == b or abs(a - b) < resolution:
        return "the same"
    return "lower" if a < b else "higher"


def interleaved(variants: dict[str, Callable[[], object]], cycles: int = MIN_PAIRS,
                warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time each callable ``cycles`` times, taking turns (A, B, A, B, ...) after ``warmup``
    untimed calls of each: seconds per call, by name.  ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs before each clock read.

    Example:
        >>> t = interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(100))}, cycles=3)
        >>> sorted(t), len(t["a"])
        (['a', 'b'], 3)
    """
    sync = sync or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(cycles):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times
