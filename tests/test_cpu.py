"""backend/cpu.py: thread_map runs torch work on parallel threads, one op thread each."""

import threading

import pytest
import torch

from backend.cpu import thread_map


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


def test_thread_map_on_one_thread_runs_inline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert thread_map(lambda i: threading.get_ident(), range(3)) == [threading.get_ident()] * 3
    finally:
        torch.set_num_threads(threads)
