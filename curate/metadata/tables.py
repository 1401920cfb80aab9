"""Small Arrow/numpy helpers shared by sources, the store and selection."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def lists_from_pairs(rows: np.ndarray, values: pa.Array, n_rows: int) -> pa.ListArray:
    """Group `values` into one list per row; `rows` must be sorted ascending."""
    offsets = np.searchsorted(rows, np.arange(n_rows + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def list_parts(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(row index of each element, flat values) of a list column."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    import pyarrow.compute as pc

    parents = pc.list_parent_indices(lists).to_numpy()
    return parents, pc.list_flatten(lists)


def csr_gather(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate values[offsets[r]:offsets[r+1]] for each r; also return the
    position in `rows` each element came from. Vectorized, no Python loop."""
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, values.dtype), np.empty(0, np.int64)
    owner = np.repeat(np.arange(len(rows)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return values[np.repeat(starts, lengths) + within], owner
