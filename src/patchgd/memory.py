"""Peak-memory measurement and memory budgets.

PatchGD exists to train under a memory budget, so the numbers reported here must be ones a user can
trust and reproduce. Two meters share one interface, :class:`PeakMemory`:

* On CUDA it reads the caching allocator's own statistics (``torch.cuda.max_memory_allocated``): the
  absolute peak of tensor memory on the device, which includes everything already allocated when the
  measurement started (parameters, gradients, optimizer state).
* On every other device (in practice the CPU) there is no allocator statistic to read, and process RSS or
  ``tracemalloc`` are neither deterministic nor about tensors. Instead a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every tensor produced by an ATen operator
  (factory ops, forward ops and the ops autograd runs in backward, which on CPU run on the calling
  thread), counts each new storage once, and subtracts it when the storage is freed. Tensors that exist
  before the measurement are invisible to it, so the caller names the relevant ones with ``baseline=``
  (modules, optimizers, tensors) to get an absolute number comparable to CUDA's.

Example:
    >>> model = torch.nn.Linear(1000, 1000)
    >>> with PeakMemory("cpu", baseline=[model]) as pm:
    ...     model(torch.randn(64, 1000)).sum().backward()
    >>> pm.baseline_bytes, pm.peak_new_bytes > 64 * 1000 * 4  # the weights; more than the output alone
    (4004000, True)
"""

from __future__ import annotations

import re
import resource
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "PeakMemory",
    "cap_cuda_memory",
    "format_size",
    "measure_peak",
    "parse_size",
    "process_peak",
]

T = TypeVar("T")

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED_FORMS = (
    "a non-negative number of bytes, optionally followed by a unit: B, KB, MB, GB, TB (powers of 1000) "
    "or KiB, MiB, GiB, TiB (powers of 1024), case-insensitive, e.g. 4000000, '4GB', '1.5 GiB'"
)


def parse_size(value: str | int) -> int:
    """Parse a human-written memory size into bytes.

    Args:
        value: A non-negative ``int`` (bytes), or a string holding a number (integer or decimal) with an
            optional unit: ``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 1000) or
            ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024). Case and a space before the unit do not
            matter.

    Returns:
        The size in bytes, rounded to the nearest integer.

    Raises:
        ValueError: If ``value`` is not one of the accepted forms.

    Example:
        >>> parse_size("4GB"), parse_size("1.5 GiB"), parse_size("512")
        (4000000000, 1610612736, 512)
    """
    # bool is an int subclass; a size of True is always a mistake.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: expected {_ACCEPTED_FORMS}")
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _UNITS):
        raise ValueError(f"invalid size {value!r}: expected {_ACCEPTED_FORMS}")
    return round(float(match.group(1)) * _UNITS[unit or "b"])


def format_size(num_bytes: int) -> str:
    """Format a byte count for humans, in powers of 1024.

    Args:
        num_bytes: A number of bytes (negative values keep their sign, for differences).

    Returns:
        ``"<n> B"`` below 1 KiB, otherwise the value with two decimals and the largest fitting unit.

    Example:
        >>> format_size(512), format_size(1536), format_size(1_320_000_000)
        ('512 B', '1.50 KiB', '1.23 GiB')
    """
    if num_bytes < 0:
        return "-" + format_size(-num_bytes)
    if num_bytes < 1024:
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit}"


def _baseline_tensors(objects: Iterable[Any]) -> Iterable[torch.Tensor]:
    """Yield every tensor held by the given tensors, modules and optimizers (with repeats)."""
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
            # Only leaves get a .grad; reading it on a non-leaf warns.
            if obj.is_leaf and obj.grad is not None:
                yield obj.grad
        elif isinstance(obj, torch.nn.Module):
            yield from _baseline_tensors(obj.parameters())
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                yield from _baseline_tensors(group["params"])
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        else:
            raise TypeError(
                f"baseline entries must be tensors, nn.Modules or optimizers, got {type(obj).__name__}"
            )


class _StorageMeter(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device, and their peak.

    Each storage is counted once, however many tensors view it, and uncounted by a ``weakref.finalize``
    on its Python object. PyTorch keeps one Python object per storage alive for as long as the storage
    itself lives, so the finalizer fires exactly when the memory is released (at once on the last
    reference drop in CPython, or at garbage collection for reference cycles).
    """

    def __init__(self, device: torch.device, baseline: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.device_type = device.type
        self.live_bytes = 0
        self.peak_bytes = 0
        # Finalizers can fire on any thread, including while this thread is inside _track.
        self._lock = threading.RLock()
        self._tracked: dict[int, list[Any]] = {}  # id(storage) -> [nbytes, finalizer]
        for tensor in baseline:
            self._track(tensor)
        self.baseline_bytes = self.live_bytes

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        with self._lock:
            entry = self._tracked.get(id(storage))
            if entry is None:
                finalizer = weakref.finalize(storage, self._release, id(storage))
                self._tracked[id(storage)] = [nbytes, finalizer]
                self.live_bytes += nbytes
            else:
                # An in-place op or out= argument may have resized a storage we already count.
                self.live_bytes += nbytes - entry[0]
                entry[0] = nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes, _ = self._tracked.pop(key)
            self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, _ = tree_flatten((args, kwargs))
        input_storages = {
            id(t.untyped_storage())
            for t in inputs
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        outputs, _ = tree_flatten(out)
        for t in outputs:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage_id = id(t.untyped_storage())
            # A view or in-place result shares its input's storage: nothing was allocated, unless the
            # storage is one we count and the op resized it. lift_fresh is the exception: torch.tensor()
            # allocates outside the dispatcher and hands the fresh tensor in as the "input".
            if storage_id in input_storages and func is not torch.ops.aten.lift_fresh.default:
                if storage_id in self._tracked:
                    self._track(t)
            else:
                self._track(t)
        return out

    def close(self) -> None:
        """Detach every finalizer so that storages outliving the measurement do not call back."""
        with self._lock:
            for _, finalizer in self._tracked.values():
                finalizer.detach()
            self._tracked.clear()


class PeakMemory:
    """Context manager measuring the peak tensor memory of a block of code on one device.

    On CUDA the numbers come from the caching allocator: ``baseline_bytes`` is
    ``torch.cuda.memory_allocated`` at entry (every tensor already on the device, including parameters,
    gradients and optimizer state) and ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` over the
    block, an absolute peak. Entering resets the device's peak statistics, so meters must not be nested
    on the same CUDA device. ``baseline`` is ignored there: the allocator already counts it.

    On other devices (the CPU) a dispatch mode counts the storages of tensors created inside the block,
    once per storage however many views share it, and subtracts them as they are freed. Pre-existing
    storages are counted only when named in ``baseline`` (tensors with their ``.grad``, modules'
    parameters, buffers and gradients, optimizers' parameters and state), each unique storage once, so
    that ``peak_bytes`` is comparable to the CUDA figure. The count is deterministic: the same step gives
    the same number every time. It sees the outputs of every ATen operator but not scratch buffers a
    single kernel allocates and frees internally, nor sparse tensors, so it is a lower bound on what the
    allocator really touches.

    In both cases ``peak_new_bytes = peak_bytes - baseline_bytes``: how much the block added at its peak.

    Args:
        device: The device to measure (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        baseline: Tensors, modules and optimizers alive before the block whose memory belongs to the
            step being measured (non-CUDA devices only).

    Example:
        >>> with PeakMemory("cpu") as pm:
        ...     x = torch.empty(1_000_000, dtype=torch.float32)
        >>> pm.peak_bytes
        4000000
    """

    def __init__(self, device: torch.device | str, baseline: Iterable[Any] = ()) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._baseline = baseline
        self._meter: _StorageMeter | None = None
        self._result: tuple[int, int] | None = None  # (baseline_bytes, peak_bytes) once measured

    def __enter__(self) -> PeakMemory:
        self._result = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_entry_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._meter = _StorageMeter(self.device, _baseline_tensors(self._baseline))
            self._meter.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._result = (self._cuda_entry_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            meter, self._meter = self._meter, None
            meter.__exit__(*exc_info)
            meter.close()
            self._result = (meter.baseline_bytes, meter.peak_bytes)

    def _measured(self) -> tuple[int, int]:
        if self._result is None:
            raise RuntimeError("PeakMemory results are available once the `with` block has exited")
        return self._result

    @property
    def baseline_bytes(self) -> int:
        """Bytes counted at entry (CUDA: all allocated memory; else: the ``baseline`` objects)."""
        return self._measured()[0]

    @property
    def peak_bytes(self) -> int:
        """Absolute peak in bytes: ``baseline_bytes`` plus the most the block added at any moment."""
        return self._measured()[1]

    @property
    def peak_new_bytes(self) -> int:
        """The most the block added above ``baseline_bytes`` at any moment."""
        baseline_bytes, peak_bytes = self._measured()
        return peak_bytes - baseline_bytes


def measure_peak(
    fn: Callable[[], T], device: torch.device | str, baseline: Iterable[Any] = ()
) -> tuple[T, int]:
    """Call ``fn()`` and return its result with the absolute peak memory it reached.

    Args:
        fn: The step to measure, called once with no arguments.
        device: The device to measure, as for :class:`PeakMemory`.
        baseline: Pre-existing tensors, modules and optimizers to count, as for :class:`PeakMemory`.

    Returns:
        ``(fn(), peak_bytes)``.

    Example:
        >>> model = torch.nn.Linear(10, 2)
        >>> logits, peak = measure_peak(lambda: model(torch.randn(4, 10)), "cpu", baseline=[model])
    """
    with PeakMemory(device, baseline=baseline) as meter:
        result = fn()
    return result, meter.peak_bytes


def process_peak(device: torch.device | str) -> tuple[str, int]:
    """The peak a user sees from outside, beside :class:`PeakMemory`'s tensor peak, with its name.

    On CUDA, ``"device peak"``: the most memory the caching allocator held on the device
    (``torch.cuda.max_memory_reserved``) since the last reset of the peak statistics (entering a
    :class:`PeakMemory` resets them), which is what the GPU must have free. Elsewhere,
    ``"process peak RSS"``: the process's resident-set high-water mark since it started (the interpreter,
    libraries and data included), what the operating system must provide.

    Args:
        device: The training device.

    Returns:
        ``(name, bytes)``.

    Example:
        >>> name, peak = process_peak("cpu")
        >>> name
        'process peak RSS'
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "device peak", torch.cuda.max_memory_reserved(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "process peak RSS", rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def cap_cuda_memory(budget_bytes: int | str, device: torch.device | str) -> bool:
    """Forbid the CUDA caching allocator from holding more than ``budget_bytes`` on ``device``.

    An allocation beyond the cap raises ``torch.OutOfMemoryError``, so a run that claims to fit a budget
    is held to it. On the CPU this does nothing and returns ``False``: PyTorch has no CPU allocator cap,
    so there a run is kept under budget by measuring its steps with :class:`PeakMemory` instead.

    Args:
        budget_bytes: The budget, as bytes or a size string accepted by :func:`parse_size`.
        device: The device to cap.

    Returns:
        ``True`` if a cap was set, ``False`` on devices without one.

    Raises:
        ValueError: If the budget is not positive or exceeds the device's total memory.

    Example:
        >>> cap_cuda_memory("4GiB", "cpu")
        False
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    budget = parse_size(budget_bytes)
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    if not 0 < budget <= total:
        raise ValueError(
            f"memory budget {format_size(budget)} ({budget} bytes) for cuda:{index} must be positive "
            f"and at most the device's total memory, {format_size(total)} ({total} bytes)"
        )
    torch.cuda.set_per_process_memory_fraction(budget / total, index)
    return True
