"""Regularization images against training images.

sd-scripts (library/train_util.py, DreamBoothDataset) collects reg images in subset order,
then file-name order, and registers them until they match the training count (with
repeats): with more reg images than that, the first ones are used every epoch and the
rest never. `sd_scripts_use` is that rule. curate instead draws proportionally:
`interleave` orders several groups so that every prefix holds each group in proportion
to its size (export names reg files in that order, so sd-scripts' first-N choice is a
proportional seeded sample), and `window` gives an epoch its share of a stream of seeded
permutations (curate train: a fresh draw per epoch, every image used before any repeats).
"""

from __future__ import annotations

import random
from functools import lru_cache


def sd_scripts_use(n_train: int, repeats: list[int]) -> list[int]:
    """sd-scripts' balancing: how many times each reg image (in its order) is used per epoch.

    First pass: each reg image with its own repeats; then one more per image, round-robin,
    until the training count is reached. Images the first pass never reached get 0.
    """
    counts = [0] * len(repeats)
    n, first = 0, True
    while repeats and n < n_train:
        for i, r in enumerate(repeats):
            counts[i] += r if first else 1
            n += r if first else 1
            if n >= n_train:
                break
        first = False
    return counts


def interleave(sizes: list[int], seed: str) -> list[tuple[int, int]]:
    """Every (group, item) once, seeded; any prefix holds each group's share to within one.

    Each group is shuffled, and its j-th item placed at (j + offset) / size on [0, 1):
    systematic sampling, so a prefix up to x holds about x * size of each group.
    """
    rng = random.Random(f"{seed}:interleave")
    keyed = []
    for g, n in enumerate(sizes):
        order = list(range(n))
        rng.shuffle(order)
        offset = rng.random()
        keyed += [((j + offset) / n, g, order[j]) for j in range(n)]
    keyed.sort()
    return [(g, i) for _, g, i in keyed]


def allocate(total: int, weights: list[int], minimum: int = 0) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder, ties to the
    first); each non-empty weight gets at least `minimum` when total allows."""
    wsum = sum(weights)
    if not wsum or total <= 0:
        return [0] * len(weights)
    exact = [total * w / wsum for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))[:total - sum(shares)]:
        shares[i] += 1
    if minimum and sum(1 for w in weights if w) * minimum <= total:
        for i, w in enumerate(weights):
            while w and shares[i] < minimum:  # take from the largest share
                j = max(range(len(shares)), key=lambda k: (shares[k], -k))
                shares[j] -= 1
                shares[i] += 1
    return shares


@lru_cache(maxsize=256)
def _cycle(seed: str, sizes: tuple[int, ...], cycle: int) -> tuple[int, ...]:
    """One cycle of the stream: an interleave of the groups, as flat positions."""
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    return tuple(starts[g] + i for g, i in interleave(list(sizes), f"{seed}:cycle:{cycle}"))


def window(sizes: list[int], take: int, epoch: int, seed: str) -> list[int]:
    """Epoch `epoch`'s `take` positions (flat, group after group) from an endless stream of
    seeded interleaves of the groups: consecutive epochs continue the stream, so every item
    comes up once before any comes up twice, and each window holds the groups in proportion.
    A pure function of its arguments, so a resumed run draws exactly what it would have."""
    sizes = tuple(sizes)
    n = sum(sizes)
    out: list[int] = []
    pos = epoch * take
    while n and len(out) < take:
        cycle, offset = divmod(pos, n)
        k = min(take - len(out), n - offset)
        out += _cycle(seed, sizes, cycle)[offset:offset + k]
        pos += k
    return out
