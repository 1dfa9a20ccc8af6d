"""The learning-rate schedule of the paper (App. C), checked step by step against its definition, and a
resume that needs nothing but the step count."""

import pytest
import torch

from patchgd.config import config_from_dict
from patchgd.engine.build import build_scheduler


def paper_rate(peak: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps to ``peak``, then linear decay reaching half the peak at
    the last step (``total - 1``)."""
    if step < warmup:
        return peak * step / warmup
    return peak * (1 - 0.5 * (step - warmup) / (total - 1 - warmup))


def optimizer():
    backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    return torch.optim.Adam([{"params": backbone.parameters(), "lr": 1e-4},
                             {"params": head.parameters(), "lr": 1e-3}])


def rates(opt, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in opt.param_groups])
        opt.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("epochs, warmup_epochs, steps_per_epoch", [(4, 2, 5), (3, 0.5, 7), (2, 0, 4)])
def test_every_step_has_the_papers_rate_in_every_group(epochs, warmup_epochs, steps_per_epoch):
    cfg = config_from_dict({"train": {"epochs": epochs, "warmup_epochs": warmup_epochs}})
    opt = optimizer()
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    seen = rates(opt, build_scheduler(cfg, opt, steps_per_epoch), total)
    for step, (backbone, head) in enumerate(seen):
        assert backbone == pytest.approx(paper_rate(1e-4, step, warmup, total), abs=1e-12)
        assert head == pytest.approx(paper_rate(1e-3, step, warmup, total), abs=1e-12)
    assert seen[-1][1] == pytest.approx(0.5e-3)


def test_a_resume_continues_from_the_step_count_alone_also_when_the_run_is_extended():
    steps_per_epoch, done = 5, 10
    cfg = config_from_dict({"train": {"epochs": 4, "warmup_epochs": 1}})
    opt = optimizer()
    scheduler = build_scheduler(cfg, opt, steps_per_epoch)
    uninterrupted = rates(opt, scheduler, cfg.train.epochs * steps_per_epoch)

    opt = optimizer()
    rates(opt, build_scheduler(cfg, opt, steps_per_epoch), done)
    saved = opt.state_dict()  # what a checkpoint keeps; the scheduler's own state is not needed
    for epochs, expected_total in ((4, 20), (6, 30)):  # the same run, and one extended to 6 epochs
        cfg = config_from_dict({"train": {"epochs": epochs, "warmup_epochs": 1}})
        resumed = optimizer()
        build_scheduler(cfg, resumed, steps_per_epoch)  # as a run builds it before loading its checkpoint
        resumed.load_state_dict(saved)
        seen = rates(resumed, build_scheduler(cfg, resumed, steps_per_epoch, steps_done=done), expected_total - done)
        for step, (_, head) in enumerate(seen, start=done):
            assert head == pytest.approx(paper_rate(1e-3, step, steps_per_epoch, expected_total), abs=1e-12)
        if epochs == 4:
            assert seen == uninterrupted[done:]  # bit for bit
