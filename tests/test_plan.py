"""The memory-budget planner: its choice, re-measured independently, fits; one step more does not."""

import math
import re

import pytest
import torch

from patchgd.engine import build
from patchgd.config import config_from_dict, config_to_dict
from patchgd.memory import PeakMemory, format_size
from patchgd.engine.plan import BudgetError, plan_budget

IMAGE = (1, 96, 96)  # a 3x3 grid of 32-pixel patches


def make_config(method, budget="1GB", batch_size=4, sampling=0.25, device="cpu", patches_per_step=None):
    return config_from_dict({
        "method": method,
        "data": {"num_classes": 10},
        "model": {"backbone": "test_convnext", "patch_size": 32, "latent_dim": 8, "head_width": 8, "in_chans": 1},
        "train": {"batch_size": batch_size, "device": device},
        "patchgd": {"sampling": sampling, "patches_per_step": patches_per_step},
        "memory": {"budget": budget},
    })


def peak_of(cfg, device="cpu", image=IMAGE):
    """Peak of a training step after a warm-up step, measured here rather than by the planner; None if a
    capped CUDA device runs out of memory."""
    torch.manual_seed(0)
    model = build.build_model(cfg).to(device)
    optimizer = build.build_optimizer(cfg, model)
    method = build.build_method(cfg, model, optimizer)
    images = torch.randint(256, (cfg.train.batch_size, *image), dtype=torch.uint8)  # as the loader yields
    labels = torch.randint(cfg.data.num_classes, (cfg.train.batch_size,))
    try:
        method.step(images, labels)
        with PeakMemory(device, baseline=(model, optimizer, images)) as meter:
            method.step(images, labels)
    except torch.OutOfMemoryError:
        return None
    return meter.peak_bytes


def check_largest_batch(method, device, image=IMAGE):
    """With a budget between the peaks of batches 2 and 3, the planned batch fits on re-measurement and
    one more image does not."""
    peaks = {b: peak_of(make_config(method, batch_size=b, device=device), device, image) for b in (2, 3)}
    budget = (peaks[2] + peaks[3]) // 2
    cfg = make_config(method, budget=str(budget), device=device)
    plan = plan_budget(cfg, image, device)
    planned = plan.apply(cfg)
    assert planned.train.batch_size == plan.batch_size
    remeasured = peak_of(planned, device, image)
    assert remeasured is not None and remeasured <= budget
    # On CUDA the planner's cap is still on: "one more" may also fail by running out of memory under it.
    one_more = peak_of(make_config(method, batch_size=plan.batch_size + 1, device=device), device, image)
    assert one_more is None or one_more > budget
    return plan, remeasured


@pytest.mark.parametrize("method", ["gd", "gd-extended", "patchgd"])
def test_largest_fitting_batch_on_cpu(method):
    plan, remeasured = check_largest_batch(method, "cpu")
    assert plan.batch_size == 2 and plan.peak_bytes == remeasured  # the CPU count is deterministic
    assert [t.batch_size for t in plan.trials] == [1, 2, 4, 3]
    assert "chose batch 2" in plan.describe()


def test_batch_capped_by_config():
    plan = plan_budget(make_config("gd", batch_size=3), IMAGE, "cpu")
    assert plan.batch_size == 3 and [t.batch_size for t in plan.trials] == [1, 2, 3]
    assert plan_budget(make_config("gd", batch_size=3), IMAGE, "cpu", max_batch_size=5).batch_size == 5


def test_plan_is_per_process_and_states_the_global_batch():
    alone = plan_budget(make_config("gd", batch_size=3), IMAGE, "cpu")
    two = plan_budget(make_config("gd", batch_size=3), IMAGE, "cpu", processes=2)
    assert two.batch_size == alone.batch_size == 3 and alone.processes == 1
    assert "global batch of 6" in two.describe() and "global" not in alone.describe()


def test_patchgd_lowers_patches_per_inner_iteration():
    # All 9 cells per inner iteration do not fit at batch 1; the budget lies between k = 3 and k = 4.
    peaks = {k: peak_of(make_config("patchgd", batch_size=1, sampling=k / 9)) for k in (3, 4)}
    budget = (peaks[3] + peaks[4]) // 2
    cfg = make_config("patchgd", budget=str(budget), batch_size=4, sampling=1.0)
    plan = plan_budget(cfg, IMAGE, "cpu")
    planned = plan.apply(cfg)
    assert (plan.batch_size, plan.patches_per_image, plan.inner_iterations) == (1, 3, 3)  # ζ = ceil(1 / (3/9))
    assert math.ceil(planned.patchgd.sampling * 9) == 3 and planned.train.batch_size == 1
    assert planned.patchgd.max_sampled == cfg.patchgd.max_sampled
    assert peak_of(planned) == plan.peak_bytes <= budget
    assert "k lowered from 9" in plan.describe()


def test_patchgd_lowers_patches_per_step_when_the_config_sets_k():
    peaks = {k: peak_of(make_config("patchgd", batch_size=1, patches_per_step=k)) for k in (2, 3)}
    budget = (peaks[2] + peaks[3]) // 2
    cfg = make_config("patchgd", budget=str(budget), batch_size=2, patches_per_step=5)
    lines = []
    plan = plan_budget(cfg, IMAGE, "cpu", log=lines.append)
    planned = plan.apply(cfg)
    assert (plan.batch_size, plan.patches_per_image, plan.inner_iterations) == (1, 2, 5)  # ζ = ceil(9 / 2)
    assert (planned.patchgd.patches_per_step, planned.patchgd.sampling) == (2, cfg.patchgd.sampling)
    assert peak_of(planned) == plan.peak_bytes <= budget
    # one progress line per trial, naming both peaks
    assert len(lines) == len(plan.trials) and all("tensor peak" in l and "process peak RSS" in l for l in lines)
    described = plan.describe()
    assert "patches_per_step" in described and "budget" in described and "on the tensor peak" in described
    header, *rows = [line for line in described.splitlines() if line.startswith("  ")]
    assert header.split() == ["batch", "micro", "k", "tensor", "peak", "process", "peak", "RSS", "fits"]
    for trial, row in zip(plan.trials, rows):  # each trial's two peaks, as measured
        assert row.split()[3:5] == format_size(trial.peak_bytes).split()
        assert row.split()[5:7] == format_size(trial.process_bytes).split()


def micro_config(budget="1GB", micro=6):
    return config_from_dict({**config_to_dict(make_config("gd", budget=budget, batch_size=6)),
                             "train": {"batch_size": 6, "micro_batch_size": micro, "device": "cpu"}})


def test_gd_with_micro_batches_keeps_the_batch_and_picks_the_largest_micro_batch():
    # The budget lies between micro-batches 2 and 3 of a batch of 6 (GD alone would get batch 2).
    peaks = {m: peak_of(micro_config(micro=m)) for m in (2, 3)}
    budget = (peaks[2] + peaks[3]) // 2
    cfg = micro_config(budget=str(budget))
    plan = plan_budget(cfg, IMAGE, "cpu")
    planned = plan.apply(cfg)
    assert (plan.batch_size, plan.micro_batch_size) == (6, 2)
    assert (planned.train.batch_size, planned.train.micro_batch_size) == (6, 2)
    assert [(t.batch_size, t.micro_batch_size) for t in plan.trials] == [(6, 1), (6, 2), (6, 4), (6, 3)]
    assert peak_of(planned) == plan.peak_bytes <= budget
    assert "chose batch 6 in micro-batches of 2 (gradients of 3 accumulate per update)" in plan.describe()
    assert plan_budget(make_config("gd", budget=str(budget), batch_size=6), IMAGE, "cpu").batch_size == 2
    with pytest.raises(BudgetError, match=r"\(gd, micro-batch 1\)"):
        plan_budget(micro_config(budget="10KB"), IMAGE, "cpu")


@pytest.mark.parametrize("method", ["gd", "patchgd"])
def test_impossible_budget_names_smallest_peak(method):
    smallest = peak_of(make_config(method, batch_size=1, sampling=1 / 9))  # batch 1, and k = 1 for PatchGD
    with pytest.raises(BudgetError, match=re.escape(f"below the smallest feasible peak {format_size(smallest)}")):
        plan_budget(make_config(method, budget="10KB", sampling=1.0), IMAGE, "cpu")


def test_unset_or_bad_budget():
    with pytest.raises(ValueError, match="memory.budget is not set"):
        plan_budget(make_config("gd", budget=None), IMAGE, "cpu")
    with pytest.raises(ValueError, match="memory.budget: invalid size '4 apples'"):
        plan_budget(make_config("gd", budget="4 apples"), IMAGE, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gd", "patchgd"])
def test_largest_fitting_batch_on_cuda(method):
    try:
        # Large enough images that the allocator's 2 MiB segments do not dominate the peaks.
        plan, _ = check_largest_batch(method, "cuda", image=(1, 512, 512))
        assert plan.capped and plan.peak_bytes <= plan.budget_bytes
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)  # the planner's cap outlives the test otherwise
