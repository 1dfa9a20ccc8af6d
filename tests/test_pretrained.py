"""Pretrained encoders, offline: a Hugging Face cache laid out by hand from timm's save_for_hf, snapshot
folders and files; freezing, layer-wise rates and gradient checkpointing against independent computations."""

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.models import save_for_hf
from safetensors.torch import load_file

import patchgd
from patchgd.checkpoint import load_checkpoint
from patchgd.cli import main
from patchgd.config import ConfigError, load_config
from patchgd.model.heads import ConvHead
from patchgd.memory import PeakMemory
from patchgd.model.pretrained import PretrainedError, resolve_encoder
from patchgd.engine.build import parameter_groups

from helpers import write_config
import test_methods
from test_methods import naive_algorithm1, random_schedule

REPO = "patchgd-test/tiny-resnet"
REVISION = "0123456789abcdef0123456789abcdef01234567"
MEAN, STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)


def save_snapshot(folder: Path, name: str = "test_resnet", seed: int = 7) -> dict:
    """A timm model with its own mean/std saved as the hub would hold it; returns its tensors."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    save_for_hf(model, str(folder), safe_serialization=True)
    return model.state_dict()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding REPO at REVISION (refs/main points to it)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    tensors = save_snapshot(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "repo": repo, "tensors": tensors}


def assert_same_tensors(module, tensors):
    state = module.state_dict()
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(state[key], value), key


def test_a_hub_name_loads_the_cached_snapshot_offline_with_its_mean_and_std(hub):
    model = patchgd.PatchGDClassifier(f"hf-hub:{REPO}", num_classes=3, patch_size=32, latent_dim=8)
    assert_same_tensors(model.backbone.features, hub["tensors"])
    assert model.normalize.mean.flatten().tolist() == pytest.approx(MEAN)
    assert model.normalize.std.flatten().tolist() == pytest.approx(STD)
    origin = model.origin
    weights = hub["repo"] / "snapshots" / REVISION / "model.safetensors"
    assert origin["source"] == f"hf-hub:{REPO}" and origin["revision"] == REVISION
    assert origin["architecture"] == "test_resnet"
    assert origin["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # data.mean/std override the weights' own
    model = patchgd.PatchGDClassifier(f"hf-hub:{REPO}", num_classes=3, patch_size=32, latent_dim=8,
                                      mean=[0.5, 0.5, 0.5], std=[1.0, 1.0, 1.0])
    assert model.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_pretrained_false_keeps_a_hub_architecture_random(hub):
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier(f"hf-hub:{REPO}", num_classes=3, patch_size=32, latent_dim=8, pretrained=False)
    assert not torch.equal(model.backbone.features.state_dict()["conv1.0.weight"], hub["tensors"]["conv1.0.weight"])
    assert set(model.normalize.mean.flatten().tolist()) == {0.0}  # no weights, no weights' normalisation


def test_one_channel_data_sums_the_stem_as_timm_adapts_it(hub):
    model = patchgd.PatchGDClassifier(f"hf-hub:{REPO}", num_classes=3, patch_size=32, latent_dim=8, in_chans=1)
    stem = hub["tensors"]["conv1.0.weight"]
    torch.testing.assert_close(model.backbone.features.conv1[0].weight, stem.sum(dim=1, keepdim=True))
    assert model.normalize.mean.item() == pytest.approx(sum(MEAN) / 3)


def test_a_snapshot_folder_and_a_file_load_exactly_and_record_their_digest(tmp_path):
    folder = tmp_path / "snapshot"
    tensors = save_snapshot(folder)
    model = patchgd.PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=8,
                                      pretrained=str(folder))
    assert_same_tensors(model.backbone.features, tensors)
    assert model.origin["source"] == f"local-dir:{folder.resolve()}"
    # a folder works for a hub name too (an offline cluster's copy), and gives the folder's mean/std
    model = patchgd.PatchGDClassifier(f"hf-hub:{REPO}", num_classes=3, patch_size=32, latent_dim=8,
                                      pretrained=str(folder))
    assert model.normalize.std.flatten().tolist() == pytest.approx(STD)
    file = folder / "model.safetensors"
    model = patchgd.GDClassifier("test_resnet", 3, pretrained=str(file))
    assert_same_tensors(model.backbone, {k: v for k, v in load_file(file).items()})
    assert model.origin["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert model.origin["file"] == str(file.resolve())


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    save_snapshot(tmp_path / "vit", name="test_vit")
    with pytest.raises(PretrainedError, match="holds a test_vit.*model.backbone is 'test_resnet'"):
        resolve_encoder("test_resnet", str(tmp_path / "vit"))


def test_missing_repository_offline_names_the_model_the_cache_and_the_ways_out(hub):
    with pytest.raises(PretrainedError) as err:
        resolve_encoder("hf-hub:nobody/nothing", None)
    message = str(err.value)
    assert "hf-hub:nobody/nothing" in message and "offline" in message
    assert str(hub["cache"] / "models--nobody--nothing") in message
    assert "hf auth login" in message and "model.pretrained" in message
    # timm's default tag, not cached: the same kind of error, naming timm's repository
    with pytest.raises(PretrainedError, match="timm/test_resnet.r160_in1k"):
        resolve_encoder("test_resnet", True)


def test_config_reads_pretrained_freeze_and_rates():
    cfg = load_config(None, ["model.pretrained=true", "model.freeze=all", "train.backbone_lr=1e-5",
                             "model.backbone_args={global_pool: token}"])
    assert cfg.model.pretrained is True and cfg.model.freeze == "all" and cfg.train.backbone_lr == 1e-5
    assert cfg.model.backbone_args == {"global_pool": "token"}
    assert load_config(None, ["model.pretrained=weights/uni.safetensors", "model.freeze=3"]).model.freeze == 3
    with pytest.raises(ConfigError, match="model.freeze: got 'some'.*int or one of 'all' or null"):
        load_config(None, ["model.freeze=some"])
    with pytest.raises(ConfigError, match="model.pretrained: got 1 .*bool or str or null"):
        load_config(None, ["model.pretrained=1"])


def test_train_on_the_offline_hub_then_predict_with_the_cache_deleted(tmp_path, hub, capsys):
    data = tmp_path / "data"
    assert main(["generate", "ultramnist", str(data), "--train", "16", "--val", "8", "--image-size", "64",
                 "--seed", "1"]) == 0
    config = write_config(tmp_path, data, model__backbone=f"hf-hub:{REPO}", model__freeze=1,
                          train__backbone_lr=1e-4)
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert f"weights from hf-hub:{REPO}@{REVISION}" in log
    assert "the pretrained weights' own" in log
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["pretrained_origin"]
    assert saved["revision"] == REVISION and saved["architecture"] == "test_resnet"
    assert load_checkpoint(run / "best.pt")["config"]["model"]["pretrained_origin"] == saved
    trained_accuracy = json.loads((run / "eval.json").read_text())["accuracy"]

    shutil.rmtree(hub["cache"])
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == trained_accuracy
    rows = list(csv.DictReader((data / "val.csv").open()))
    images = [str(data / "val" / f"{row['image_id']}.png") for row in rows]
    assert main(["predict", str(run / "best.pt"), *images, "--json"]) == 0
    predicted = [int(p["class"]) for p in json.loads(capsys.readouterr().out)]
    confusion = [[0] * 10 for _ in range(10)]  # rows: true class, as eval.json counts them
    for row, p in zip(rows, predicted):
        confusion[int(row["label"])][p] += 1
    assert confusion == json.loads((run / "eval.json").read_text())["confusion"]
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0  # no hub needed either


def vit_model(freeze):
    torch.manual_seed(0)
    return patchgd.PatchGDClassifier("test_vit", num_classes=3, patch_size=16, latent_dim=6, freeze=freeze,
                                     head=ConvHead(6, 3, width=8, dropout=0.2))


@pytest.mark.parametrize("freeze", [2, "all"])
def test_a_partly_frozen_encoder_steps_like_the_naive_loop(float64, freeze, monkeypatch):
    """test_vit (LayerNorm: per-patch and batched calls agree) with its stem and first blocks frozen."""
    monkeypatch.setattr(test_methods, "P", 16)  # the naive loop's patch size: test_vit's patch embedding
    zeta, k, eps = 3, 3, 2
    ours = vit_model(freeze)
    theirs = copy.deepcopy(ours)
    trainer = patchgd.PatchGD(ours, torch.optim.Adam(parameter_groups(ours, 1e-2)), grad_accum_steps=eps)
    naive_optimizer = torch.optim.Adam(list(theirs.backbone.parameters()) + list(theirs.head.parameters()), lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen and any(n.startswith("backbone.features.blocks.1.") for n in frozen)
    assert not any(n.startswith("backbone.features.blocks.2.") for n in frozen) or freeze == "all"
    generator = torch.Generator().manual_seed(1)
    for batch_seed in (10, 11):
        torch.manual_seed(batch_seed)
        images, labels = torch.randn(2, 3, 32, 48), torch.tensor([2, 0])  # a 2 x 3 grid
        schedule = random_schedule(generator, zeta, k, 6, 2, per_image=True)
        torch.manual_seed(batch_seed)
        trainer.step(images, labels, schedule=schedule)
        torch.manual_seed(batch_seed)
        naive_algorithm1(theirs.backbone, theirs.head, naive_optimizer, images, labels, schedule, eps)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7, msg=lambda d, name=name: f"{name}: {d}")
    for name, before in frozen.items():  # bit for bit, and no optimizer state
        assert torch.equal(dict(ours.named_parameters())[name], before), name
    held = {id(p) for p in trainer.optimizer.state}
    assert not any(id(p) in held for p in ours.parameters() if not p.requires_grad)
    assert held == {id(p) for p in ours.parameters() if p.requires_grad}


def test_frozen_batchnorm_keeps_its_statistics():
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=8, freeze="all")
    before = copy.deepcopy(model.backbone.features.state_dict())
    projection = model.backbone.proj.weight.detach().clone()
    trainer = patchgd.PatchGD(model, torch.optim.Adam(parameter_groups(model, 1e-2)), sampling=0.5)
    trainer.step(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    for key, value in model.backbone.features.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.backbone.proj.weight, projection)  # the projection to s trains


def test_layer_decay_gives_each_group_its_rate():
    model = patchgd.PatchGDClassifier("test_vit", num_classes=3, patch_size=16, latent_dim=6)
    groups = parameter_groups(model, lr=1e-3, backbone_lr=1e-4, layer_decay=0.5)
    # test_vit: the stem, 6 blocks (the last with the final norm); then projection and head at train.lr
    encoder = model.backbone.features
    assert len(groups) == 8
    for i, group in enumerate(groups[:-1]):
        assert group["lr"] == pytest.approx(1e-4 * 0.5 ** (6 - i))
    assert {id(p) for p in groups[-2]["params"]} == {id(p) for p in [*encoder.blocks[5].parameters(),
                                                                     *encoder.norm.parameters()]}
    assert {id(p) for p in groups[0]["params"]} == {id(encoder.cls_token), id(encoder.pos_embed),
                                                    id(encoder.patch_embed.proj.weight),
                                                    id(encoder.patch_embed.proj.bias)}
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in [*model.backbone.proj.parameters(),
                                                                     *model.head.parameters()]}
    assert groups[-1]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("backbone, patch, lower", [("test_resnet", 64, 1.0), ("test_vit", 32, 0.8)])
def test_gradient_checkpointing_gives_the_same_step_with_a_lower_peak(backbone, patch, lower):
    """The same parameters and BatchNorm statistics as without it, and a lower tensor peak (test_resnet's
    stem, which timm does not checkpoint, holds most of its activations; test_vit's blocks are checkpointed)."""
    images, labels = torch.randn(2, 3, 128, 128), torch.tensor([0, 2])
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = patchgd.PatchGDClassifier(backbone, num_classes=3, patch_size=patch, latent_dim=8, head_width=8,
                                          grad_checkpointing=checkpointing)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        trainer = patchgd.PatchGD(model, optimizer, sampling=1.0, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        trainer.step(images, labels)
        with PeakMemory(torch.device("cpu"), baseline=(model, optimizer, images)) as meter:
            trainer.step(images, labels)
        results[checkpointing] = model, meter.peak_bytes
    (plain, plain_peak), (checkpointed, checkpointed_peak) = results[False], results[True]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda d, name=name: f"{name}: {d}")
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):  # BatchNorm statistics moved once
        assert torch.equal(a, b), name
    assert checkpointed_peak < lower * plain_peak, (checkpointed_peak, plain_peak)


def test_init_backbone_takes_a_hub_name(hub):
    from patchgd.engine.build import init_backbone

    model = patchgd.PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=8)
    assert init_backbone(model, f"hf-hub:{REPO}") == len([k for k in hub["tensors"]])
    assert_same_tensors(model.backbone.features, hub["tensors"])


def test_the_planner_measures_freezing_and_checkpointing():
    from patchgd.engine.plan import plan_budget

    def peak(*overrides):
        cfg = load_config(None, ["model.backbone=test_vit", "model.patch_size=32", "model.latent_dim=8",
                                 "model.head_width=8", "data.num_classes=2", "train.batch_size=2",
                                 "memory.budget=1GB", "patchgd.sampling=1.0", *overrides])
        return next(t.peak_bytes for t in plan_budget(cfg, (3, 128, 128), "cpu").trials if t.batch_size == 2)

    plain = peak()
    assert peak("model.grad_checkpointing=true") < 0.8 * plain
    assert peak("model.freeze=all") < 0.8 * plain


class Payload:
    """An object whose unpickling would import and call this module's code."""


def test_a_weights_file_that_would_run_code_is_refused_and_the_cli_exits_2(tmp_path, hub, capsys):
    path = tmp_path / "unsafe.pth"
    torch.save({"conv1.0.weight": Payload()}, path)  # weights_only refuses to unpickle it
    with pytest.raises(PretrainedError, match="unsafe.pth is not a plain weights file"):
        patchgd.PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, pretrained=str(path))
    config = write_config(tmp_path, tmp_path, model__backbone="hf-hub:nobody/nothing")
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "hf-hub:nobody/nothing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def lay_out_hub_repo(cache: Path, repo: str, name: str) -> dict:
    """``repo`` in the cache's ``models--ORG--NAME/snapshots/REV/`` layout, as the hub would leave it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    tensors = save_snapshot(folder / "snapshots" / REVISION, name=name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return tensors


def test_pretrained_true_loads_timms_default_tag_from_the_cache(hub):
    """``pretrained: true`` for a registry name: timm's default tag names the hub repository."""
    tensors = lay_out_hub_repo(hub["cache"], "timm/test_resnet.r160_in1k", "test_resnet")
    model = patchgd.GDClassifier("test_resnet", 3, pretrained=True)
    assert_same_tensors(model.backbone, {k: v for k, v in tensors.items()})
    assert model.backbone.fc.out_features == 3  # a new classifier; the weights had none
    assert model.origin["source"] == "hf-hub:timm/test_resnet.r160_in1k" and model.origin["revision"] == REVISION


def test_a_vit_takes_another_patch_size_by_resampling_its_position_table(tmp_path):
    folder = tmp_path / "vit"
    tensors = save_snapshot(folder, name="test_vit")  # built for 160 px inputs: a 10 x 10 position table
    model = patchgd.PatchGDClassifier("test_vit", num_classes=3, patch_size=32, latent_dim=8, pretrained=str(folder))
    features = model.backbone.features
    assert tensors["pos_embed"].shape[1] == 1 + 100 and features.pos_embed.shape[1] == 1 + 4
    assert torch.equal(features.blocks[0].attn.qkv.weight, tensors["blocks.0.attn.qkv.weight"])
    assert model.fill_z(torch.rand(1, 3, 64, 64)).shape == (1, 8, 2, 2)


def test_backbone_args_name_timm_and_torch_layers_as_model_cards_do():
    """UNI2-h's card passes timm.layers.SwiGLUPacked (a partial of GluMlp) and torch.nn.SiLU."""
    from timm.layers import GluMlp

    model = patchgd.PatchGDClassifier("test_vit", num_classes=3, patch_size=16, latent_dim=8, backbone_args={
        "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "mlp_ratio": 2.0})
    assert isinstance(model.backbone.features.blocks[0].mlp, GluMlp)
    with pytest.raises(PretrainedError, match="'torch.nn.functional' is not a layer class"):
        patchgd.PatchGDClassifier("test_vit", num_classes=3, patch_size=16, backbone_args={"act_layer": "torch.nn.functional"})


def test_layer_decay_leaves_a_gd_classifier_at_the_head_rate_and_ranks_the_encoder_without_it():
    model = patchgd.GDClassifier("test_resnet", 3)
    groups = parameter_groups(model, lr=1e-3, backbone_lr=1e-4, layer_decay=0.5)
    # test_resnet: the stem and one block in each of 4 stages, then the classifier (fc) at train.lr
    assert [g["lr"] for g in groups] == pytest.approx([1e-4 * 0.5 ** 4, 1e-4 * 0.5 ** 3, 1e-4 * 0.25, 1e-4 * 0.5,
                                                       1e-4, 1e-3])
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in model.backbone.fc.parameters()}
    assert {id(p) for p in groups[-2]["params"]} == {id(p) for p in model.backbone.layer4.parameters()}


def write_class_folders(root: Path, channels: int) -> None:
    """``root/{train,val}/{dark,light}/*.png``: 64 px images, grey or RGB, 3 + 2 per class and split."""
    rng = np.random.default_rng(channels)
    for split, count in (("train", 3), ("val", 2)):
        for name, level in (("dark", 70), ("light", 180)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                shape = (64, 64) if channels == 1 else (64, 64, 3)
                pixels = np.clip(level + rng.normal(0, 30, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}{i}.png")


def weights_origin(kind: str, tmp_path: Path, hub: dict) -> tuple[dict, Path, tuple]:
    """The config's model keys for pretrained weights of ``kind``, the folder that deleting takes them away
    with, and the mean/std (3 channels) the weights were trained with."""
    if kind == "hub":
        return {"backbone": f"hf-hub:{REPO}"}, hub["cache"], (MEAN, STD)
    # A registry name's weights (its default tag from the cache, or a bare file) come with timm's own
    # pretrained config for the name, which gives their mean/std.
    registry = timm.models.get_pretrained_cfg("test_resnet")
    if kind == "cache":  # pretrained: true, timm's default tag found in the Hugging Face cache
        lay_out_hub_repo(hub["cache"], "timm/test_resnet.r160_in1k", "test_resnet")
        return {"backbone": "test_resnet", "pretrained": True}, hub["cache"], (registry.mean, registry.std)
    folder = tmp_path / "snapshot"
    save_snapshot(folder)
    if kind == "folder":
        return {"backbone": "test_resnet", "pretrained": str(folder)}, folder, (MEAN, STD)
    return ({"backbone": "test_resnet", "pretrained": str(folder / "model.safetensors")}, folder,
            (registry.mean, registry.std))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["cache", "folder", "file", "hub"])
def test_a_model_trained_from_pretrained_weights_predicts_evaluates_and_resumes_without_them(
        tmp_path, hub, capsys, kind, channels):
    """The normalisation a run took from its pretrained weights (their own mean/std, data.mean/std left
    unset) travels in the checkpoint: with the weights gone, ``evaluate`` reproduces the run's own
    validation loss, ``predict`` its predictions, and ``--resume`` continues."""
    data = tmp_path / "data"
    write_class_folders(data, channels)
    model_keys, weights_home, (mean, std) = weights_origin(kind, tmp_path, hub)
    if channels == 1:  # timm sums an RGB stem into one channel; the statistics are averaged the same way
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    config = write_config(tmp_path, data, model__in_chans=channels, data__num_classes=None,
                          train__batch_size=2, **{f"model__{k}": v for k, v in model_keys.items()})
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    trained = json.loads((run / "eval.json").read_text())

    shutil.rmtree(weights_home)
    model, _ = patchgd.load_model(run / "best.pt")
    assert model.normalize.mean.flatten().tolist() == pytest.approx(mean)
    assert model.normalize.std.flatten().tolist() == pytest.approx(std)
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt"), "--data", str(data / "val"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(trained["loss"], abs=1e-6)
    assert scored["confusion"] == trained["confusion"]
    images = sorted((data / "val" / "light").glob("*.png"))
    assert main(["predict", str(run / "best.pt"), *map(str, images), "--json"]) == 0
    predicted = [p["class_name"] for p in json.loads(capsys.readouterr().out)]
    assert predicted.count("light") == trained["confusion"][1][1]
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    resumed = [line for line in (run / "train.log").read_text().splitlines() if "normalisation:" in line][-1]
    assert f"mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]}" in resumed
