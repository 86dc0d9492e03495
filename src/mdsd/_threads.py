"""Thread counts of torch and numpy's BLAS: a scoped setting and a process-wide one.

Kept apart from the array operations (``mdsd._array_ops``): these are process settings used by
the CLI, the benchmarks, the sweeps and the race quadrature, not array code.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``torch.set_num_threads(threads)``, restoring the previous setting afterwards.

    None leaves torch's setting alone.
    """
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and in numpy's BLAS (the engine's float32 CPU matmul,
    ``mdsd.engine.static_llama``), so that a thread setting applies to both."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")
