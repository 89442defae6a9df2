"""backend/cpu.py: thread_map runs torch work on parallel threads, one op thread each."""

import threading

import pytest
import torch

from backend.cpu import thread_map, thread_slices


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_thread_map_keeps_order_one_op_thread_each_and_restores(two_threads):
    both = threading.Barrier(2, timeout=30)  # the first two items run at the same time

    def item(i: int) -> tuple:
        if i < 2:
            both.wait()
        return i, torch.get_num_threads(), threading.get_ident()

    seen = thread_map(item, range(9))
    assert [s[0] for s in seen] == list(range(9))
    assert {s[1] for s in seen} == {1}
    assert threading.get_ident() not in {s[2] for s in seen}
    assert torch.get_num_threads() == 2


def test_thread_map_raises_and_restores(two_threads):
    with pytest.raises(ZeroDivisionError):
        thread_map(lambda i: 1 / i, [1, 0, 2])
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("grad", [False, True])
def test_thread_map_runs_items_under_the_callers_grad_mode(two_threads, grad):
    """Grad mode is per thread: under no_grad the items must record no autograd graph either."""
    with torch.set_grad_enabled(grad):
        assert thread_map(lambda i: torch.is_grad_enabled(), range(4)) == [grad] * 4
    assert torch.is_grad_enabled()


def test_thread_map_on_one_thread_runs_inline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert thread_map(lambda i: threading.get_ident(), range(3)) == [threading.get_ident()] * 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n, chunk", [(0, 8), (1, 8), (7, 8), (100, 8), (101, 1000), (64, 16)])
def test_thread_slices_cover_the_range_in_equal_pieces(two_threads, n, chunk):
    parts = thread_slices(n, chunk)
    covered = [i for s in parts for i in range(n)[s]]
    assert covered == list(range(n))
    lengths = [len(range(n)[s]) for s in parts]
    assert max(lengths) <= chunk
    if n >= 2:
        assert len(parts) % 2 == 0 and max(lengths) - min(lengths) <= 1
