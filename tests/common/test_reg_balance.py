"""Reg balancing: sd-scripts' rule, and curate's proportional, seeded, resumable draw."""

from collections import Counter

from curate.common import reg_balance


def test_sd_scripts_rule_is_round_robin_in_order():
    use = reg_balance.sd_scripts_use
    assert use(5, [1, 1, 1]) == [2, 2, 1]
    assert use(3, [1] * 10) == [1, 1, 1] + [0] * 7  # extra reg images unused
    assert use(12, [1] * 5) == [3, 3, 2, 2, 2]
    assert use(4, [3, 3]) == [3, 3]  # first pass takes each image's repeats
    assert use(10, []) == []


def test_every_prefix_of_the_interleave_is_proportional():
    order = reg_balance.interleave([1000, 1000, 250], "seed")
    assert sorted(order) == [(g, i) for g, n in enumerate([1000, 1000, 250]) for i in range(n)]
    for k in (1, 7, 100, 300, 1234, 2249):
        counts = Counter(g for g, _ in order[:k])
        for g, n in enumerate([1000, 1000, 250]):
            assert abs(counts[g] - k * n / 2250) < 1 + 1e-9, (k, g)
    assert order == reg_balance.interleave([1000, 1000, 250], "seed")
    assert order != reg_balance.interleave([1000, 1000, 250], "other")


def test_allocate_is_proportional_with_a_minimum():
    assert reg_balance.allocate(10, [3, 3, 4]) == [3, 3, 4]
    assert reg_balance.allocate(7, [1, 1, 1]) == [3, 2, 2]
    assert reg_balance.allocate(5, [100, 1, 1], minimum=1) == [3, 1, 1]
    assert reg_balance.allocate(1, [9, 1], minimum=1) == [1, 0]  # not enough for a minimum each
    assert reg_balance.allocate(4, [0, 5]) == [0, 4] and reg_balance.allocate(3, []) == []


def test_window_stream_uses_everything_before_repeating():
    sizes = [30, 10]
    windows = [reg_balance.window(sizes, 8, e, "s") for e in range(10)]
    assert all(len(w) == 8 for w in windows)
    assert set(sum(windows[:5], [])) == set(range(40))  # the first 40 draws: each item once
    assert sorted(sum(windows[:5], [])) == list(range(40))
    assert windows[3] == reg_balance.window(sizes, 8, 3, "s")  # a pure function: resumable
    # more draws than items: every item at least once per epoch
    assert set(reg_balance.window([3, 2], 12, 0, "s")) == set(range(5))
