"""One run setup: the trainer, the memory planner and the diagnosis build the same model, optimizer, step
and loaders from the same config (patchgd.engine.setup), so a planned or diagnosed step is the step that
trains."""

import torch
import yaml

import patchgd.engine.plan
import patchgd.engine.setup
import patchgd.engine.trainer
from benchmarks import diagnose
from patchgd.config import config_from_dict
from patchgd.data.augment import Augment

from helpers import spotted_images


RAW = {"model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "in_chans": 1, "head": "attention",
                 "head_width": 8, "channels_last": True},
       "data": {"val_fraction": 0.4},
       "train": {"epochs": 1, "batch_size": 5, "device": "cpu", "warmup_epochs": 0.5, "heatmap_every": 0,
                 "optimizer": "adamw", "backbone_lr": 1e-4, "layer_decay": 0.5, "weight_decay": 0.01},
       "augment": {"flip": True, "brightness": 0.1},
       "patchgd": {"sampling": 0.5, "grad_accum_steps": 1, "fill_mode": "eval"}}


def spy(monkeypatch, module, name, calls, who, describe=None):
    """Record what ``module.name`` builds, as ``describe`` sees it right then (before any step trains it)."""
    real = getattr(module, name)

    def recording(*args, **kwargs):
        made = real(*args, **kwargs)
        calls.append((who, describe(made) if describe else made))
        return made

    monkeypatch.setattr(module, name, recording)


def describe_training(training):
    """What a step is: the model's layout, weights and memory format, the optimizer's groups, the step's settings."""
    model, method = training.model, training.method
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return {
        "model": type(model).__name__, "head": type(model.head).__name__,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
        # the lr a group started at (a run's schedule has moved it since)
        "groups": [(g.get("initial_lr", g["lr"]), g["weight_decay"], len(g["params"])) for g in training.optimizer.param_groups],
        "optimizer": type(training.optimizer).__name__,
        "step": type(method).__name__,
        "settings": {k: getattr(method, k) for k in ("sampling", "max_sampled", "grad_accum_steps", "fill_mode",
                                                     "amp") if hasattr(method, k)},
    }


def test_the_planner_measures_the_step_fit_trains(tmp_path, monkeypatch):
    calls = []
    spy(monkeypatch, patchgd.engine.plan, "build_training", calls, "plan", describe_training)
    spy(monkeypatch, patchgd.engine.trainer, "build_training", calls, "fit", describe_training)
    root = spotted_images(tmp_path / "data", n=5, shape=(64, 96))
    cfg = config_from_dict({**RAW, "output_dir": str(tmp_path / "run"), "memory": {"budget": "2GB"},
                            "data": {**RAW["data"], "root": str(root)}})
    patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    planned = [made for who, made in calls if who == "plan"]
    (fit,) = [made for who, made in calls if who == "fit"]
    assert planned, "the planner built no trial step"
    plan = planned[-1]
    plan_weights, fit_weights = plan.pop("weights"), fit.pop("weights")
    assert plan == fit
    assert plan["channels_last"] and plan["head"] == "AttentionMILHead" and len(plan["groups"]) > 2
    # seeded alike: each trial starts from the weights the run starts from
    assert plan_weights.keys() == fit_weights.keys()
    for name, value in plan_weights.items():
        torch.testing.assert_close(value, fit_weights[name], rtol=0, atol=0, msg=name)


def test_the_diagnosis_trains_with_the_loaders_and_augmentation_fit_uses(tmp_path, monkeypatch):
    calls = []
    spy(monkeypatch, diagnose, "build_loaders", calls, "diagnose")
    spy(monkeypatch, patchgd.engine.trainer, "build_loaders", calls, "fit")
    spy(monkeypatch, diagnose, "build_training", calls, "diagnose", describe_training)
    spy(monkeypatch, patchgd.engine.trainer, "build_training", calls, "fit", describe_training)
    root = spotted_images(tmp_path / "data", n=5, shape=(64, 96))
    raw = {**RAW, "output_dir": str(tmp_path / "run"), "data": {**RAW["data"], "root": str(root)}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    patchgd.engine.trainer.fit(config_from_dict(raw), log=lambda line: None)
    assert diagnose.main_of(diagnose.register, ["--config", str(config), "--out", str(tmp_path / "diag")]) == 0
    loaders = {who: made for who, made in calls if hasattr(made, "val")}
    trainings = {who: made for who, made in calls if isinstance(made, dict)}

    def describe(loaders):
        train = loaders.train
        return {"batch_size": train.batch_size, "drop_last": train.drop_last, "workers": train.num_workers,
                "sampler": type(train.sampler).__name__, "collate": train.collate_fn,
                "transform": type(train.dataset.transform).__name__, "images": len(train.dataset),
                "val_batch_size": loaders.val.batch_size, "val_images": len(loaders.val.dataset)}

    assert describe(loaders["diagnose"]) == describe(loaders["fit"])
    assert describe(loaders["fit"])["transform"] == Augment.__name__
    assert describe(loaders["fit"])["drop_last"]  # 6 training images in batches of 5: the last of one is dropped
    diagnosed, trained = trainings["diagnose"], trainings["fit"]
    for name, value in diagnosed.pop("weights").items():
        torch.testing.assert_close(value, trained["weights"][name], rtol=0, atol=0, msg=name)
    trained.pop("weights")
    assert diagnosed == trained
