"""Tests for patchgd.memory: size parsing and the peak-memory meters.

Expected byte counts are worked out by hand from tensor shapes and dtypes (numel * element size).
"""

import pytest
import torch

from patchgd.memory import PeakMemory, cap_cuda_memory, format_size, measure_peak, parse_size

MB = 1_000_000
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- parse_size / format_size -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * 10**9),
        ("4gb", 4 * 10**9),
        ("4 GB", 4 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("1.5 gib", 3 * 2**29),
        ("512", 512),
        ("512B", 512),
        ("2KB", 2000),
        ("2KiB", 2048),
        ("3MB", 3 * 10**6),
        ("3MiB", 3 * 2**20),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        (".5KiB", 512),
        ("  7 mb ", 7 * 10**6),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts_documented_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GB", "4 G", "4XB", "-1GB", "1,5GB", "4 GB GB", "1e9", -5, True, 1.5, None]
)
def test_parse_size_rejects_with_value_and_forms_in_message(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "KiB" in message and "GB" in message


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * 2**20, "5.00 MiB"),
        (1_320_000_000, "1.23 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (5000 * 2**40, "5000.00 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_size(num_bytes, expected):
    assert format_size(num_bytes) == expected


# --- CPU meter: counting allocations ------------------------------------------------------------------


def test_factory_allocation_counted_exactly():
    with PeakMemory("cpu") as pm:
        torch.empty(1_000_000, dtype=torch.float32)
    assert pm.peak_bytes == 4 * MB
    assert pm.peak_new_bytes == 4 * MB
    assert pm.baseline_bytes == 0


def test_dtype_sizes_respected():
    with PeakMemory("cpu") as pm:
        a = torch.zeros(1000, dtype=torch.float64)  # 8000
        b = torch.ones(1000, dtype=torch.int8)  # 1000
        c = torch.full((10, 10), 2.0, dtype=torch.bfloat16)  # 200
        del a, b, c
    assert pm.peak_bytes == 9200


def test_torch_tensor_from_python_data_counted():
    # torch.tensor allocates outside the dispatcher and then calls lift_fresh.
    with PeakMemory("cpu") as pm:
        torch.tensor([1.0, 2.0, 3.0])
    assert pm.peak_bytes == 12


def test_views_share_one_storage():
    with PeakMemory("cpu") as pm:
        x = torch.empty(1000, 1000)
        views = [x.view(-1), x[10:], x.t(), x.reshape(100, 10_000), x.detach(), x.unsqueeze(0), x[::2]]
        del views
    assert pm.peak_bytes == 4 * MB


def test_views_of_preexisting_tensor_not_counted():
    x = torch.empty(1000, 1000)
    with PeakMemory("cpu") as pm:
        x.view(-1)
        x[5:].t()
    assert pm.peak_bytes == 0


def test_in_place_ops_add_nothing():
    x = torch.zeros(1000, 1000)
    with PeakMemory("cpu") as pm:
        x.add_(1)
        x.mul_(2)
        x.relu_()
        x.zero_()
        x[:10].fill_(3)
    assert pm.peak_bytes == 0
    with PeakMemory("cpu", baseline=[x]) as pm:
        x.add_(1)
        torch.relu_(x)
    assert pm.peak_bytes == pm.baseline_bytes == 4 * MB


def test_out_of_place_op_counts_its_result():
    x = torch.zeros(1000, 1000)
    with PeakMemory("cpu", baseline=[x]) as pm:
        y = x + 1
        del y
    assert pm.baseline_bytes == 4 * MB
    assert pm.peak_new_bytes == 4 * MB


def test_out_argument_resize_counted():
    a = torch.ones(1000, 1000)
    with PeakMemory("cpu") as pm:
        out = torch.empty(0)
        torch.add(a, a, out=out)
    assert pm.peak_bytes == 4 * MB


def test_freed_storages_subtracted_promptly():
    # Ten 1 MB tensors allocated and dropped one after another never coexist.
    with PeakMemory("cpu") as pm:
        for _ in range(10):
            t = torch.ones(250_000)
            del t
    assert pm.peak_bytes == 1 * MB


def test_storage_freed_only_when_last_view_dies():
    with PeakMemory("cpu") as pm:
        x = torch.empty(250_000)
        view = x[1:]
        del x
        y = torch.empty(250_000)  # the view still holds the first 1 MB
        del view, y
        z = torch.empty(250_000)
        del z
    assert pm.peak_bytes == 2 * MB


def test_peak_is_maximum_not_final():
    with PeakMemory("cpu") as pm:
        a = torch.empty(500_000)  # 2 MB
        b = torch.empty(250_000)  # 3 MB live
        del a, b
        c = torch.empty(125_000)  # 0.5 MB live at the end
    assert pm.peak_bytes == 3 * MB
    del c


def test_other_devices_ignored_by_cpu_meter():
    with PeakMemory("cpu") as pm:
        torch.empty(1_000_000, device="meta")
    assert pm.peak_bytes == 0


# --- CPU meter: autograd ------------------------------------------------------------------------------


def test_backward_allocations_counted():
    # Forward makes a 4 KB output; only backward creates the 4 MB gradient of w (outer(grad_out, v)).
    w = torch.randn(1000, 1000, requires_grad=True)
    v = torch.randn(1000)
    with PeakMemory("cpu", baseline=[w, v]) as pm:
        (w @ v).sum().backward()
    assert pm.baseline_bytes == 4 * MB + 4000
    assert 4 * MB <= pm.peak_new_bytes < 4 * MB + 50_000
    assert w.grad is not None


def _tiny_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
    )


def test_conv_activations_kept_for_backward():
    model = _tiny_convnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), PeakMemory("cpu", baseline=[model, x]) as no_grad:
        model(x).sum()
    with PeakMemory("cpu", baseline=[model, x]) as with_grad:
        model(x).sum().backward()
    assert with_grad.baseline_bytes == no_grad.baseline_bytes
    # The output alone is 2*8*32*32 floats = 64 KiB; with grad, activations are saved for backward.
    assert no_grad.peak_new_bytes >= 2 * 8 * 32 * 32 * 4
    assert with_grad.peak_bytes > no_grad.peak_bytes


def test_training_step_deterministic():
    model = _tiny_convnet()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 3, 32, 32)

    def step():
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    step()  # creates Adam state, so later steps allocate the same tensors
    peaks = []
    for _ in range(3):
        with PeakMemory("cpu", baseline=[model, optimizer, x]) as pm:
            step()
        peaks.append((pm.baseline_bytes, pm.peak_bytes))
    assert peaks[0] == peaks[1] == peaks[2]


# --- CPU meter: baseline ------------------------------------------------------------------------------


def test_baseline_counts_module_grads_and_adam_state_once():
    model = torch.nn.Linear(100, 10)  # weight 1000 + bias 10 floats
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 100)).sum().backward()
    optimizer.step()
    param_bytes = (1000 + 10) * 4
    # params + grads + exp_avg + exp_avg_sq, plus Adam's two float32 "step" scalars.
    expected = 4 * param_bytes + 2 * 4
    with PeakMemory("cpu", baseline=[model, optimizer, model.weight, model.weight[0], model]) as pm:
        pass
    assert pm.baseline_bytes == pm.peak_bytes == expected
    assert pm.peak_new_bytes == 0


def test_baseline_counts_buffers_and_tied_parameters_once():
    embedding = torch.nn.Embedding(100, 10)
    model = torch.nn.ModuleDict(
        {"a": embedding, "b": torch.nn.Linear(10, 100, bias=False), "bn": torch.nn.BatchNorm1d(10)}
    )
    model["b"].weight = embedding.weight  # tied, as in language models
    # embedding 1000 floats; BatchNorm weight, bias, running mean/var 4*10 floats, num_batches 1 int64.
    expected = 1000 * 4 + 40 * 4 + 8
    with PeakMemory("cpu", baseline=[model]) as pm:
        pass
    assert pm.baseline_bytes == expected


def test_baseline_freed_during_step_lowers_live_count():
    model = torch.nn.Linear(1000, 1000, bias=False)
    model(torch.randn(1, 1000)).sum().backward()
    with PeakMemory("cpu", baseline=[model]) as pm:
        model.zero_grad(set_to_none=True)  # frees the 4 MB gradient
        torch.empty(1_000_000)  # reuses its room
    assert pm.baseline_bytes == 8 * MB
    assert pm.peak_bytes == 8 * MB


def test_baseline_rejects_unknown_objects():
    with pytest.raises(TypeError, match="str"):
        with PeakMemory("cpu", baseline=["weights.pt"]):
            pass


# --- interface ----------------------------------------------------------------------------------------


def test_results_unavailable_inside_block():
    with PeakMemory("cpu") as pm:
        with pytest.raises(RuntimeError, match="exited"):
            pm.peak_bytes


def test_meter_closes_cleanly_on_exception_and_reuse():
    meter = PeakMemory("cpu")
    with pytest.raises(ZeroDivisionError):
        with meter:
            kept = torch.empty(250_000)
            1 / 0
    assert meter.peak_bytes == 1 * MB
    del kept  # its finalizer was detached: freeing after the block must not touch the meter
    with meter:
        torch.empty(500_000)
    assert meter.peak_bytes == 2 * MB


def test_nested_cpu_meters_agree_on_inner_allocations():
    with PeakMemory("cpu") as outer:
        torch.empty(250_000)
        with PeakMemory("cpu") as inner:
            torch.empty(500_000)
    assert inner.peak_bytes == 2 * MB
    assert outer.peak_bytes == 2 * MB


def test_measure_peak_returns_result_and_peak():
    result, peak = measure_peak(lambda: torch.ones(250_000).sum(), "cpu")
    assert result.item() == 250_000
    assert peak == 1 * MB + 4


def test_cap_cuda_memory_is_a_noop_on_cpu():
    assert cap_cuda_memory("4GiB", "cpu") is False
    assert cap_cuda_memory(1, torch.device("cpu")) is False


# --- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
def test_cuda_meter_counts_allocation_and_entry_memory():
    device = torch.device("cuda")
    held = torch.empty(1_000_000, device=device)
    torch.cuda.synchronize()
    entry = torch.cuda.memory_allocated()
    with PeakMemory(device) as pm:
        torch.empty(1_000_000, device=device)
    assert pm.baseline_bytes == entry >= 4 * MB
    # The caching allocator rounds block sizes up (to 512 bytes for large blocks).
    assert 4 * MB <= pm.peak_new_bytes < 4 * MB + 2**20
    assert pm.peak_bytes == pm.baseline_bytes + pm.peak_new_bytes
    del held


@pytest.mark.cuda
@requires_cuda
def test_cuda_conv_step_grad_exceeds_no_grad():
    model = _tiny_convnet().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad(), PeakMemory("cuda") as no_grad:
        model(x).sum()
    with PeakMemory("cuda") as with_grad:
        model(x).sum().backward()
    assert with_grad.peak_bytes > no_grad.peak_bytes


@pytest.mark.cuda
@requires_cuda
def test_cap_cuda_memory_sets_fraction_and_rejects_oversized_budget():
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(ValueError, match="total memory"):
        cap_cuda_memory(total + 1, "cuda:0")
    with pytest.raises(ValueError, match="positive"):
        cap_cuda_memory(0, "cuda:0")
    try:
        assert cap_cuda_memory("256MiB", "cuda:0") is True
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda:0")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_process_peak_on_cpu_is_the_peak_rss():
    from patchgd.memory import process_peak

    def vm_hwm() -> int:  # the kernel's own record of the peak resident set, in kB
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        pytest.skip("no /proc/self/status")

    name, peak = process_peak("cpu")
    assert name == "process peak RSS"
    # getrusage and /proc account the same high-water mark slightly differently (page-table pages)
    assert peak == pytest.approx(vm_hwm(), rel=0.01)
