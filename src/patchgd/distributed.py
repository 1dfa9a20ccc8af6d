"""Everything distributed: the process group, samplers, gathering, one writer, failures, the parallel fill.

Training on several processes is launched by ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in the environment::

    torchrun --standalone --nproc_per_node 2 -m patchgd train --config X.yaml

:func:`process_group` joins the group it describes (NCCL on GPUs, gloo on CPUs); every other helper here
works on the group that is initialised, and degrades to the single-process behaviour without one, so the
training loop has one code path. ``train.batch_size`` is the batch of one process: the global batch is
``batch_size * world_size``. The step classes (:mod:`patchgd.methods`) only learn when to synchronise
gradients (:meth:`~patchgd.methods.PatchGD.step` runs its non-updating inner iterations under
``no_sync()``); the model's fill never communicates, unless :func:`parallel_fill` splits it on purpose.

Example:
    >>> import patchgd
    >>> model = patchgd.PatchGDClassifier("test_resnet", num_classes=2, patch_size=32, latent_dim=8)
    >>> with process_group("auto"):                 # under torchrun, or alone
    ...     device = local_device(torch.device("cpu"))
    ...     model = model.to(device)
    ...     method = patchgd.create_method("patchgd", model, torch.optim.Adam(model.parameters()),
    ...                                    wrap=ddp(device))  # DDP when there are several processes
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

__all__ = ["process_group", "is_initialized", "rank", "world_size", "is_main", "local_device", "ddp",
           "convert_sync_batchnorm", "train_sampler", "eval_shard", "gather_in_order", "gather_objects",
           "broadcast_object", "broadcast_buffers", "mean_loss", "RankFailure", "parallel_fill", "barrier",
           "batch_note"]


_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
# all_gather_into_tensor was renamed all_gather_single (PyTorch 2.14), the old name deprecated.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankFailure(RuntimeError):
    """A process hit a failure every process must stop for; the message names that process."""


def is_initialized() -> bool:
    """Whether a process group is up (otherwise everything here is the single-process case)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 alone)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 alone)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process is the one that writes files and prints progress (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """Join the process group ``torchrun`` describes in the environment, for the duration of the block.

    Without ``WORLD_SIZE`` > 1 in the environment (a plain ``patchgd train``) nothing is initialised.
    A group initialised by the caller (``torch.multiprocessing.spawn``) is used and left alone.

    Args:
        device: ``train.device``: ``"auto"`` and ``"cuda"`` pick NCCL when CUDA is available, with the GPU
            ``LOCAL_RANK``; ``"cpu"`` picks gloo.
    """
    created = False
    if not is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``device``, with a CUDA device narrowed to this process's GPU (``LOCAL_RANK``) in a group."""
    if device.type == "cuda" and is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def _backend_device() -> torch.device:
    """Where tensors for a collective must live: the GPU for NCCL, the CPU for gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ddp(device: torch.device) -> Callable[[nn.Module], nn.Module] | None:
    """What puts a step's forward module under DistributedDataParallel on ``device`` when there are several
    processes (the ``wrap`` of :func:`patchgd.create_method`); None alone.

    Buffers are not broadcast on every forward (BatchNorm running statistics are per process, like its
    batch statistics); :func:`broadcast_buffers` makes them rank 0's before evaluating and saving.
    """
    if world_size() == 1:
        return None
    # Newer PyTorch renamed broadcast_buffers (and warns about the old name); both keep the sync at init.
    option = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
    return functools.partial(DistributedDataParallel, device_ids=[device] if device.type == "cuda" else None,
                             **{option: False})


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with SyncBatchNorm, so BatchNorm sees the batch statistics of every process.

    Raises:
        ValueError: On the CPU: PyTorch's SyncBatchNorm runs on GPUs only (gloo has none).
    """
    if device.type != "cuda":
        raise ValueError("train.sync_batchnorm=true needs CUDA devices: PyTorch's SyncBatchNorm runs on GPUs "
                         f"only, and this run is on {device} (gloo); set train.sync_batchnorm=false, and "
                         "BatchNorm statistics are per process")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def train_sampler(dataset: Dataset, seed: int, shared: bool = False) -> DistributedSampler | None:
    """The training sampler: each process a disjoint, seeded shard, reshuffled by ``set_epoch(epoch)``.

    Every process gets the same number of batches (a short set is padded with a few repeated images),
    so the learning-rate schedule counts global steps alike on every process.

    Args:
        dataset: The training set.
        seed: ``train.seed``; with the epoch it fixes the order, so a resumed epoch shuffles alike.
        shared: Give every process the whole set in the same order (the patch-parallel fill, where the
            processes of the group work on the same images).

    Returns:
        None without a process group (the loader shuffles itself).
    """
    if world_size() == 1:
        return None
    replicas, index = (1, 0) if shared else (world_size(), rank())
    return DistributedSampler(dataset, num_replicas=replicas, rank=index, shuffle=True, seed=seed)


def eval_shard(dataset: Dataset) -> Dataset:
    """This process's share of an evaluation set: images ``rank, rank + world, ...``, none repeated.

    :func:`gather_in_order` puts the shards' results back in the set's order.
    """
    if world_size() == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


def gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the per-process results of :func:`eval_shard` shards back into the set's order.

    Shards differ in length by at most one when the set is not a multiple of the processes; every
    image appears exactly once.
    """
    if world_size() == 1:
        return tensor
    shards = gather_objects(tensor.cpu())
    out = torch.empty((sum(s.shape[0] for s in shards), *tensor.shape[1:]), dtype=tensor.dtype)
    for r, shard in enumerate(shards):
        out[r::len(shards)] = shard
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics), which its checkpoint holds."""
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    """Wait for every process (nothing alone)."""
    if world_size() > 1:
        dist.barrier()


def mean_loss(loss: float, where: str) -> float:
    """The mean of every process's training loss; every process raises if any one's is not finite.

    Gathering the loss of each step is one tiny collective at a point where the processes synchronise
    anyway (the gradient all-reduce), and it turns one process's divergence into a clean stop of all.

    Args:
        loss: This process's loss of the step.
        where: Where in training, for the message (e.g. ``"epoch 3, step 17"``).

    Raises:
        RankFailure: Naming the first process whose loss is NaN or infinite.
    """
    world = world_size()
    losses = torch.tensor([loss], dtype=torch.float64, device=_backend_device())
    if world > 1:
        gathered = torch.empty(world, dtype=torch.float64, device=losses.device)
        _all_gather_tensor(gathered, losses)
        losses = gathered
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero().flatten()
    if bad.numel():
        who = f"rank {bad[0].item()} of {world}: " if world > 1 else ""
        raise RankFailure(f"{who}non-finite training loss {losses[bad[0]].item()} at {where}; stopping "
                          "(lower train.lr, or check the inputs of that batch)")
    return losses.mean().item()


def parallel_fill(model, grid, chunk: int) -> torch.Tensor:
    """Fill ``Z`` of one batch on all processes together: each encodes its share of the cells, then all
    gather.

    Every process must hold the same images. The backbone runs on the same chunks of ``chunk`` patches as
    :meth:`~patchgd.PatchGDClassifier.fill_z` alone, chunk ``i`` on process ``i % world``, so ``Z`` is
    the single-process ``Z`` bit for bit (BatchNorm in training mode included: its batch statistics are
    those of the chunk). Only BatchNorm's running statistics see a share of the chunks per process.

    Args:
        model: The unwrapped :class:`~patchgd.PatchGDClassifier` (no gradient hooks).
        grid: The batch's :class:`~patchgd.grid.PatchGrid`, the same on every process.
        chunk: Patches per backbone call.

    Returns:
        ``Z`` of shape ``(B, s, m, n)`` (``(B, s, n)`` for sequences), the same on every process.
    """
    world, me = world_size(), rank()
    z = model.fill_z(grid, chunk, shard=(me, world))
    if world == 1:
        return z
    batch, s = z.shape[:2]
    cells = z[0, 0].numel()  # m * n, or n for sequences
    total = batch * cells
    flat = z.view(batch, s, cells).permute(0, 2, 1).reshape(total, s)  # row (b, cell) in fill order

    def owned(r: int) -> torch.Tensor:  # the rows of the chunks r, r + world, ...
        starts = torch.arange(min(r * chunk, total), total, chunk * world, device=z.device)
        rows_r = (starts[:, None] + torch.arange(chunk, device=z.device)).flatten()
        return rows_r[rows_r < total]

    shares = [owned(r) for r in range(world)]
    # Every process sends as many rows as the largest share (zero-padded), so the gather is one tensor.
    most = max(share.numel() for share in shares)
    send = torch.zeros(most, s, dtype=z.dtype, device=z.device)
    send[:shares[me].numel()] = flat[shares[me]]
    received = torch.empty(world * most, s, dtype=z.dtype, device=z.device)
    _all_gather_tensor(received, send)
    received = received.view(world, most, s)
    for r, share in enumerate(shares):
        flat[share] = received[r, :share.numel()]
    return flat.view(batch, cells, s).permute(0, 2, 1).reshape(z.shape)


def batch_note(per_process_batch: int) -> str:
    """How the per-process batch reads in a log line, with the global batch when there are several."""
    world = world_size()
    if world == 1:
        return f"batch {per_process_batch}"
    return f"batch {per_process_batch} per process x {world} processes = {per_process_batch * world} global"

