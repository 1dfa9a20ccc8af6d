"""Which cells carry gradients: ``k`` per inner iteration, ``ζ``, and the default sampler's schedule."""

from __future__ import annotations

import math

import torch


def _ceil(x: float) -> int:
    """``ceil`` that ignores float noise: ``0.28 * 25`` is ``7.000000000000001``, meant as 7."""
    return math.ceil(round(x, 9))


def patches_per_iteration(sampling: float, num_cells: int, patches_per_step: int | None = None) -> int:
    """``k``, the cells per image that carry gradients in one inner iteration: ``ceil(sampling * m * n)``,
    or the absolute ``patches_per_step`` when given (at most ``m * n``)."""
    if patches_per_step is not None:
        return min(patches_per_step, num_cells)
    return _ceil(sampling * num_cells)


def default_inner_iterations(sampling: float, max_sampled: float) -> int:
    """``ζ = ceil(max_sampled / sampling)``: inner iterations that visit ``max_sampled`` of the cells."""
    return _ceil(max_sampled / sampling)


def sample_schedule(batch_size: int, num_cells: int, k: int, inner_iterations: int,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The default sampler: ``inner_iterations`` chunks of ``k`` cells per image, without repeats.

    Per image, cells come from a random permutation of all ``num_cells`` cells, taken ``k`` at a time;
    when a permutation runs out, a fresh one continues it, with the cells still in the current chunk
    moved to its end, so that no chunk ever holds a cell twice.

    Args:
        batch_size: Images ``B``.
        num_cells: Cells per image ``m * n``.
        k: Cells per image and inner iteration (``1 <= k <= num_cells``).
        inner_iterations: Number of chunks ``ζ``.
        generator: Random generator (default: torch's global one).

    Returns:
        A list of ``inner_iterations`` LongTensors of shape ``(B, k)``.
    """
    total = k * inner_iterations
    orders = []
    for _ in range(batch_size):
        order = torch.randperm(num_cells, generator=generator)
        while order.numel() < total:
            # The chunk still open at the end of ``order`` must not meet its own cells again.
            open_chunk = order[order.numel() // k * k:]
            fresh = torch.randperm(num_cells, generator=generator)
            clash = torch.isin(fresh, open_chunk)
            order = torch.cat([order, fresh[~clash], fresh[clash]])
        orders.append(order[:total])
    return list(torch.stack(orders).view(batch_size, inner_iterations, k).unbind(1))
