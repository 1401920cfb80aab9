"""Shared by the training tests."""

import pytest


# One torch thread: on the 2 shared cores a second OpenMP thread mostly spin-waits (10x slower
# here). CLI runs get OMP_NUM_THREADS=1 for the same reason.
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
