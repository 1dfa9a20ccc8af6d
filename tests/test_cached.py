"""PatchGD with a persistent Z (patchgd.fill: cached): the cases where it is Algorithm 1 exactly, what it
encodes otherwise, and the store's consistency with the checkpoints."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import patchgd
from patchgd.config import AugmentConfig, ConfigError
from patchgd.methods.cached import CachedZ
from patchgd.zstore import ZStore

from helpers import TinyEncoder
from test_methods import make_model, naive_algorithm1, random_schedule


def keyed(labels, keys):
    return torch.stack([torch.as_tensor(labels), torch.as_tensor(keys)], dim=1)


def test_refreshing_every_cell_is_algorithm1(float64):
    """``refresh`` as large as the grid: every step fills every image whole with the current weights, which is
    Algorithm 1 (the naive loop of DESIGN.md) to 1e-6, over batches that revisit images."""
    zeta, k = 3, 4
    ours = make_model()
    theirs = copy.deepcopy(ours)
    store = ZStore.create([12] * 3, width=6, dtype="float32")
    trainer = patchgd.PatchGD(ours, torch.optim.Adam(ours.parameters(), lr=1e-2), grad_accum_steps=2,
                              cache=CachedZ(ours, store, refresh=12))
    naive_optimizer = torch.optim.Adam(list(theirs.backbone.parameters()) + list(theirs.head.parameters()), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    data = torch.randn(3, 3, 20, 30)  # three images of a 3 x 4 grid
    for step, keys in enumerate([[0, 1], [1, 2], [2, 0]]):
        images, labels = data[keys], torch.tensor([2, 0])
        schedule = random_schedule(generator, zeta, k, 12, 2, per_image=True)
        torch.manual_seed(step)
        trainer.step(images, keyed(labels, keys), schedule=schedule)
        torch.manual_seed(step)
        naive_algorithm1(theirs.backbone, theirs.head, naive_optimizer, images, labels, schedule, 2)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda d, name=name: f"{name}: {d}")
    assert [store.stamps(i).max() for i in range(3)] == [2, 1, 2]  # every image stored at its last visit


@pytest.mark.parametrize("freeze_grad_accum", [1, None])
def test_a_frozen_encoder_with_a_float32_store_is_algorithm1_exactly(freeze_grad_accum):
    """With ``model.freeze: all`` the store holds the encoder's features; later steps read them instead of
    encoding, and every update equals the exact step's bit for bit."""
    images = torch.randn(3, 3, 64, 96)  # 2 x 3 grids of 32 px
    runs = {}
    for fill in ("exact", "cached"):
        torch.manual_seed(0)
        model = patchgd.PatchGDClassifier("test_resnet", num_classes=3, patch_size=32, latent_dim=8, head_width=8,
                                          freeze="all")
        cache = None
        if fill == "cached":
            cache = CachedZ(model, ZStore.create([6] * 3, width=model.feature_dim, dtype="float32"), features=True)
        trainer = patchgd.PatchGD(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                                  sampling=0.5, grad_accum_steps=freeze_grad_accum, cache=cache,
                                  generator=torch.Generator().manual_seed(3))
        for step, keys in enumerate([[0, 1], [1, 2], [0, 1], [2, 0]]):
            labels = torch.tensor([1, 2])
            torch.manual_seed(step)
            trainer.step(images[keys], labels if cache is None else keyed(labels, keys))
        runs[fill] = model
    for (name, a), b in zip(runs["exact"].state_dict().items(), runs["cached"].state_dict().values()):
        assert torch.equal(a, b), name


def test_a_cached_step_encodes_the_sampled_and_the_oldest_cells_only():
    """After an image's first visit, a step encodes ``refresh`` of its cells without gradients (the oldest,
    none of them sampled) and the ``k ζ`` sampled ones with; the codes they make are stored."""
    model = make_model()
    calls = {"grad": 0, "no_grad": 0}
    model.backbone.register_forward_hook(
        lambda m, inputs, out: calls.__setitem__("grad" if torch.is_grad_enabled() else "no_grad",
                                                 calls["grad" if torch.is_grad_enabled() else "no_grad"] + len(out)))
    store = ZStore.create([12, 12], width=6)
    cache = CachedZ(model, store, refresh=2)
    trainer = patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sampling=0.25, max_sampled=0.5,
                              cache=cache, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 20, 30)
    trainer.step(images, keyed([0, 1], [0, 1]))  # first visit: both filled whole
    assert calls == {"grad": 2 * 3 * 2, "no_grad": 2 * 12}
    first = store.stamps(0).copy()
    calls.update(grad=0, no_grad=0)
    trainer.step(images, keyed([0, 1], [0, 1]))  # k = 3, ζ = 2 with gradients; 2 refreshed without, per image
    assert calls == {"grad": 2 * 3 * 2, "no_grad": 2 * 2}
    stamps = store.stamps(0)
    assert (stamps == 1).sum() == 3 * 2 + 2 and (stamps == 0).sum() == 12 - 8  # the 8 cells encoded at step 1
    assert (first == 0).all()


def test_a_refill_period_fills_every_image_whole_at_its_first_visit():
    model = make_model()
    store = ZStore.create([12], width=6)
    cache = CachedZ(model, store, refresh=0)
    trainer = patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sampling=0.25, max_sampled=0.25,
                              cache=cache, generator=torch.Generator().manual_seed(0))
    image = torch.randn(1, 3, 20, 30)
    for epoch in (1, 2, 3):
        cache.begin_epoch(epoch, steps_per_epoch=1, refresh_epochs=2)
        before = cache.encoded["whole"]
        trainer.step(image, keyed([0], [0]))
        assert cache.encoded["whole"] - before == (12 if epoch in (1, 3) else 0), epoch


def test_a_store_on_disk_rewinds_to_its_checkpoint_after_a_kill(tmp_path):
    """Writes after the checkpoint of epoch 1 are undone, newest first; a journal record cut short by the
    kill (whose rows were never written) is ignored; epoch 1's own journal is dropped, its writes kept."""
    store = ZStore.create([4, 4], width=2, folder=tmp_path / "z")
    store.begin_epoch(1)
    store.write(torch.tensor([0, 1]), torch.tensor([0, 3]), torch.ones(2, 2), step=0)
    store.commit(1)  # last.pt of epoch 1 is written
    checkpoint = (np.array(store.codes), store.stamps(0).copy(), store.stamps(1).copy())
    store.begin_epoch(2)
    store.write(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.full((2, 2), 2.0), step=5)
    store.write(torch.tensor([0]), torch.tensor([0]), torch.full((1, 2), 3.0), step=6)
    journal = tmp_path / "z" / "journal-2-r0.bin"
    with journal.open("ab") as f:  # a kill in the middle of a third record's journal entry
        f.write(np.array([1, 2], np.int64).tobytes())
    reopened = ZStore.open(tmp_path / "z", [4, 4], 2, "float16")
    assert reopened.rewind(1) == 3
    assert np.array_equal(np.array(reopened.codes), checkpoint[0])
    assert (reopened.stamps(0) == checkpoint[1]).all() and (reopened.stamps(1) == checkpoint[2]).all()
    assert not list((tmp_path / "z").glob("journal-*"))
    with pytest.raises(ValueError, match="a Z store of another layout.*width"):
        ZStore.open(tmp_path / "z", [4, 4], 3, "float16")


def test_a_cached_run_evaluates_every_few_epochs_and_says_what_its_store_holds(tmp_path):
    import csv

    import patchgd.engine.trainer
    from patchgd.checkpoint import load_checkpoint
    from test_evaluation import csv_data, run_config

    root = csv_data(tmp_path / "data", {"train": 8, "val": 4})
    cfg = run_config(tmp_path, root, epochs=3, eval_every=2)
    cfg = dataclasses.replace(cfg, patchgd=dataclasses.replace(cfg.patchgd, fill="cached", refresh=2))
    lines = []
    summary = patchgd.engine.trainer.fit(cfg, log=lines.append)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [bool(r["val_accuracy"]) for r in rows] == [False, True, True]  # epochs 2 and 3 (the last)
    assert summary["best_epoch"] in (2, 3) and load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] in (2, 3)
    assert any(line.startswith("epoch 1/3") and "not evaluated (train.eval_every=2)" in line for line in lines)
    # 8 images of 3 x 3 cells of 16 px, 8 float16 values and a stamp each
    assert "Z store: 8 images, 72 cells of 8 float16 (codes): 1.69 KiB in memory" in "\n".join(lines)
    with pytest.raises(ConfigError, match=r"fill=cached and augment\.\*"):
        patchgd.engine.trainer.fit(dataclasses.replace(cfg, output_dir=str(tmp_path / "run2"),
                                                       augment=AugmentConfig(flip=True)), log=lambda line: None)


def test_subbag_steps_on_k_cells_per_image_and_evaluates_every_cell():
    """Sub-bag training: a step encodes k cells per image with gradients and nothing else; the update equals
    one written out here (the set head on those cells' codes); inference encodes every cell."""
    from patchgd.methods.subbag import SubBag

    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=3, patch_size=8, latent_dim=6, head="mean",
                                      head_width=8, head_dropout=0.0)
    theirs = copy.deepcopy(model)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, out: calls.append((torch.is_grad_enabled(), len(out))))
    generator = torch.Generator().manual_seed(5)
    step = SubBag(model, torch.optim.SGD(model.parameters(), lr=0.1), sampling=0.25, generator=generator)
    images, labels = torch.randn(2, 3, 24, 32), torch.tensor([1, 2])  # 3 x 4 grids: k = 3
    stats = step.step(images, labels)
    assert calls == [(True, 6)] and stats["patches_per_image"] == 3
    # the same cells, drawn again from the same generator state, through the other model by hand
    redraw = torch.Generator().manual_seed(5)
    picked = [torch.randperm(12, generator=redraw)[:3] for _ in range(2)]
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1)
    bags = []
    for b, cells in enumerate(picked):
        patches = torch.stack([images[b, :, (c // 4) * 8:(c // 4 + 1) * 8, (c % 4) * 8:(c % 4 + 1) * 8] for c in cells])
        bags.append(theirs.backbone(patches).mean(dim=0))
    torch.nn.functional.cross_entropy(theirs.head.mlp(torch.stack(bags)), labels).backward()
    optimizer.step()
    for (name, a), b in zip(model.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, msg=lambda d, name=name: f"{name}: {d}")
    calls.clear()
    with torch.no_grad():
        model.eval()(images)
    assert sum(n for _, n in calls) == 2 * 12  # inference: every cell


def test_the_planner_states_the_store_a_cached_run_keeps(tmp_path):
    from patchgd.engine.plan import plan_from_config
    from test_evaluation import csv_data, run_config

    root = csv_data(tmp_path / "data", {"train": 8, "val": 4})
    cfg = run_config(tmp_path, root)
    cfg = dataclasses.replace(cfg, patchgd=dataclasses.replace(cfg.patchgd, fill="cached", store="disk"),
                              memory=dataclasses.replace(cfg.memory, budget="1GB"))
    described = plan_from_config(cfg, "cpu").describe()
    assert f"Z store: 8 images, 72 cells of 8 float16 (codes): 1.69 KiB on disk in {tmp_path / 'run' / 'zstore'}" \
        in described


def test_staleness_reads_a_cached_runs_store_against_its_final_encoder(tmp_path):
    """benchmarks/staleness.py: with weights that do not move (a frozen encoder, a learning rate of 1e-12),
    every stored code is the final encoder's to float16 rounding and the head scores the stored and the fresh
    Z alike; a store read in another order or shape would not be."""
    from benchmarks.staleness import measure
    from test_evaluation import csv_data, run_config

    import patchgd.engine.trainer

    root = csv_data(tmp_path / "data", {"train": 8, "val": 4})
    cfg = run_config(tmp_path, root, epochs=2, lr=1e-12)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, freeze=4),
                              patchgd=dataclasses.replace(cfg.patchgd, fill="cached", fill_mode="eval"))
    patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    result = measure(tmp_path / "run")
    assert result["images"] == 8 and result["cells"] == 72 and result["epoch"] == 2
    assert result["median_distance"] < 2e-3  # float16
    assert sum(b["cells"] for b in result["by_age"]) == 72
    heads = result["head_on"]
    assert heads["stored"]["accuracy"] == heads["fresh"]["accuracy"]
    assert heads["stored"]["loss"] == pytest.approx(heads["fresh"]["loss"], abs=1e-3)


def test_staleness_tells_the_batchnorm_statistics_from_the_weights(tmp_path):
    """With a learning rate of 1e-12 from a given backbone, the weights stay where they started and only
    BatchNorm's running statistics move (they follow the sampled cells' batches): putting the weights back
    changes no code, putting the statistics back does."""
    from benchmarks.staleness import measure
    from test_evaluation import csv_data, run_config

    import patchgd.engine.trainer

    root = csv_data(tmp_path / "data", {"train": 8, "val": 4})
    start = run_config(tmp_path / "start", root, epochs=1)
    patchgd.engine.trainer.fit(start, log=lambda line: None)
    cfg = run_config(tmp_path, root, epochs=2, lr=1e-12)
    begun = str(tmp_path / "start" / "run" / "last.pt")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_backbone=begun),
                              patchgd=dataclasses.replace(cfg.patchgd, fill="cached", fill_mode="eval"))
    patchgd.engine.trainer.fit(cfg, log=lambda line: None)
    moved = measure(tmp_path / "run")["moved_by"]
    assert moved["weights"] < 1e-6
    assert moved["statistics"] > 1e-2
