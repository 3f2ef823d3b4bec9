"""The one rule for comparing measurements (bloomkit.measure.compare)."""
import pytest

from bloomkit.measure import compare


def test_a_verdict_needs_the_whole_range_on_one_side_of_one():
    fast = compare.compare_times([1, 1, 1, 1, 1], [1.3, 1.1, 1.2, 1.25, 1.4])
    assert fast.verdict == compare.FASTER and fast.high == pytest.approx(1 / 1.1)
    assert fast.low == pytest.approx(1 / 1.4)
    assert fast.ratio == pytest.approx(1 / 1.25)
    slow = compare.compare_times([1.3, 1.1, 1.2, 1.25, 1.4], [1, 1, 1, 1, 1])
    assert slow.verdict == compare.SLOWER and slow.ratio == pytest.approx(1.25)
    # one pair of five on the other side: the spreads overlap
    mixed = compare.compare_times([1, 1, 1, 1, 1], [1.3, 1.1, 1.2, 1.25, 0.95])
    assert mixed.verdict == compare.SAME


def test_fewer_pairs_than_the_rule_give_no_verdict():
    c = compare.compare_times([1, 1], [2, 2])
    assert c.verdict == compare.TOO_FEW and "too few" in c.sentence()
    assert compare.compare_times([1, 1], [2, 2], min_pairs=2).verdict == compare.FASTER


def test_sentences_say_what_the_numbers_say():
    fast = compare.compare_times([1.0] * 5, [2.0, 2.2, 1.8, 2.0, 2.1])
    assert fast.sentence("compiled", "eager").startswith("compiled is 2.00x faster than eager (1.80x-2.20x")
    same = compare.compare_times([1.0] * 5, [1.1, 0.9, 1.0, 1.05, 0.95])
    assert same.sentence("bf16", "fp32").startswith("no measurable difference between bf16 and fp32")
    slow = compare.compare_times([2.0, 2.2, 1.8, 2.0, 2.1], [1.0] * 5)
    assert "2.00x slower" in slow.sentence() and "1.80x-2.20x" in slow.sentence()


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="pairs"):
        compare.compare_times([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        compare.compare_times([0.0], [1.0])


def test_values_below_the_resolution_are_the_same():
    assert compare.compare_values(70.02, 70.0, 0.05) == "the same"
    assert compare.compare_values(69.0, 70.0, 0.05) == "lower"
    assert compare.compare_values(71.0, 70.0, 0.05) == "higher"


def test_interleaved_takes_turns():
    order = []
    t = compare.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                            cycles=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert len(t["a"]) == len(t["b"]) == 3 and all(x >= 0 for x in t["a"] + t["b"])
