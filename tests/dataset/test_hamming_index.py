"""curate.dataset.hamming_index: the multi-index search against brute force, and the clusters."""

from itertools import combinations

import numpy as np
import pytest

from curate.dataset import hamming_index


def brute(h, t):
    u = np.asarray(h, np.int64).view(np.uint64)
    return {(i, j) for i, j in combinations(range(len(u)), 2) if bin(int(u[i] ^ u[j])).count("1") <= t}


@pytest.mark.parametrize("threshold", [0, 3, 8, 12, 20])
def test_pairs_within_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    centres = rng.integers(-(2**63), 2**63 - 1, size=40, dtype=np.int64)
    h = np.repeat(centres, 8).view(np.uint64)
    for _ in range(6):  # scatter members 0..6 bits from their centre
        bit = rng.integers(0, 64, size=len(h)).astype(np.uint64)
        h = np.where(rng.random(len(h)) < 0.7, h ^ (np.uint64(1) << bit), h)
    h = np.concatenate([h, h[:5]]).view(np.int64)  # exact repeats too
    i, j = hamming_index.pairs_within(h, threshold)
    assert set(zip(i.tolist(), j.tolist())) == brute(h, threshold)
    assert len(i) > 0


def test_pairs_within_in_worker_processes_agrees():
    rng = np.random.default_rng(9)
    h = rng.integers(-(2**63), 2**63 - 1, size=100_000, dtype=np.int64)
    h[50_000:50_500] = h[:500] ^ (1 << rng.integers(0, 64, size=500))  # 1-bit twins
    one = hamming_index.pairs_within(h, 6, workers=1)
    two = hamming_index.pairs_within(h, 6, workers=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    assert {(a, b) for a, b in zip(*one) if b == a + 50_000} == {(k, k + 50_000) for k in range(500)}


def test_clusters_are_transitive():
    labels = hamming_index.clusters(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2] and labels[4] == labels[5]
    assert len({labels[0], labels[3], labels[4]}) == 3
