"""Data-parallel training against single-process training, on 2 gloo processes on the CPU.

Every multi-process test spawns its processes with ``torch.multiprocessing`` once and has them write what
they saw into files; the single-process references are computed here, in the test process.
"""

import copy
import functools
import os
import socket
import sys
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import patchgd
from patchgd import distributed
from patchgd.checkpoint import load_checkpoint
from patchgd.config import config_from_dict
from patchgd.data.prepare.ultramnist import generate_ultramnist
from patchgd.engine.loop import evaluate

from helpers import TinyEncoder

WORLD = 2
P = 8            # patch side
B = 4            # global batch: 2 images per process
H, W = 16, 24    # a 2 x 3 grid of 6 cells
K = 2            # cells per image and inner iteration
ZETA = 3         # inner iterations per batch
STEPS = 3        # batches (optimizer updates >= 3 in every case)
CLASSES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args):
    """Run ``fn(rank, *args)`` on 2 gloo processes; an exception on either fails the call.

    Forked, not spawned: a spawned process re-imports torch and timm, which takes this shared CPU far
    longer than the test itself (the suite runs torch single-threaded, so forking is safe).
    """
    # torch writes a failed process's error file into the temporary folder and leaves it there.
    with tempfile.TemporaryDirectory() as errors, mock.patch.object(tempfile, "tempdir", errors):
        mp.start_processes(_entry, args=(_free_port(), fn, args), nprocs=WORLD, join=True, start_method="fork")


# --- the same global batch on 1 and on 2 processes -------------------------------------------------------

class TinyHead(nn.Module):
    """A head without BatchNorm or dropout: per-process batches then compute what the global batch does."""

    def __init__(self, latent_dim, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(latent_dim, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, z):
        return self.net(z)


CASES = {"patchgd eps=1": 1, "patchgd eps=zeta": ZETA, "patchgd eps=2, partial last group": 2, "gd": None,
         "gd micro-batches": None, "gd-extended": None,
         "patchgd parallel fill": 2}  # both processes hold the global batch and split its fill


def _build(case, processes=False):
    """The case's model and step; with ``processes``, built for the process group (DDP, and the parallel
    fill in its case)."""
    torch.manual_seed(0)
    if case in ("gd", "gd micro-batches"):
        model = patchgd.GDClassifier(TinyEncoder(latent_dim=CLASSES), CLASSES)
    elif case == "gd-extended":
        model = patchgd.GDExtendedClassifier(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU()), CLASSES,
                                             feature_dim=6, head=TinyHead(6, CLASSES))
    else:
        model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), CLASSES, patch_size=P, latent_dim=6,
                                          head=TinyHead(6, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    parallel = processes and case == "patchgd parallel fill"
    method = patchgd.create_method(case.split()[0] if case.startswith("gd") else "patchgd", model, optimizer,
                                   micro_batch_size=1 if case == "gd micro-batches" else None,
                                   inner_iterations=ZETA, grad_accum_steps=CASES[case], fill_batch_size=5,
                                   wrap=distributed.ddp(torch.device("cpu")) if processes else None,
                                   fill=functools.partial(distributed.parallel_fill, model) if parallel else None)
    return model, method


def _data():
    """``STEPS`` global batches with their per-image schedules."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, 3, H, W, generator=g), torch.randint(0, CLASSES, (B,), generator=g),
             [torch.stack([torch.randperm(6, generator=g)[:K] for _ in range(B)]) for _ in range(ZETA)])
            for _ in range(STEPS)]


def _train(method, case, data, part=slice(None)):
    for images, labels, schedule in data:
        if case.startswith("gd"):
            method.step(images[part], labels[part])
        else:
            method.step(images[part], labels[part], schedule=[idx[part] for idx in schedule])


def _steps_worker(rank, out_dir):
    torch.set_default_dtype(torch.float64)
    part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    results = {}
    for case in CASES:
        model, method = _build(case, processes=True)
        calls = []

        def counting_allreduce(state, bucket):  # one call per gradient bucket that is all-reduced
            calls.append(1)
            return allreduce_hook(state, bucket)

        method.forward_module.register_comm_hook(None, counting_allreduce)
        _train(method, case, _data(), slice(None) if case == "patchgd parallel fill" else part)
        results[case] = {"params": copy.deepcopy(model.state_dict()), "allreduces": len(calls)}
    try:  # a non-finite loss on rank 1 stops both ranks with rank 1's message
        distributed.mean_loss(float("nan") if rank == 1 else 1.0, "epoch 1, step 2")
    except distributed.RankFailure as err:
        results["failure"] = str(err)
    torch.save(results, out_dir / f"steps-{rank}.pt")


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    spawn(_steps_worker, out)
    return [torch.load(out / f"steps-{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_update_like_one_on_the_global_batch(case, two_process_steps):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, method = _build(case)
        _train(method, case, _data())
    finally:
        torch.set_default_dtype(previous)
    for r, results in enumerate(two_process_steps):
        got = results[case]["params"]
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=f"rank {r}, {name}")
    # Gradients are all-reduced only on updating inner iterations (one bucket: the models are tiny).
    eps = CASES[case]
    updates_per_step = 1 if case.startswith("gd") else -(-ZETA // eps)
    assert two_process_steps[0][case]["allreduces"] == STEPS * updates_per_step


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_its_message(two_process_steps):
    for results in two_process_steps:
        assert "rank 1 of 2: non-finite training loss nan at epoch 1, step 2" in results["failure"]


def test_alone_every_helper_is_the_single_process_case():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.mean_loss(2.5, "epoch 1, step 1") == 2.5
    with pytest.raises(distributed.RankFailure, match=r"^non-finite training loss inf at epoch 1, step 4"):
        distributed.mean_loss(float("inf"), "epoch 1, step 4")
    values = torch.arange(5.0)
    assert distributed.gather_in_order(values) is values and len(distributed.eval_shard(values)) == 5
    assert distributed.train_sampler(values, seed=0) is None


# --- evaluation and the parallel fill ----------------------------------------------------------------------

VAL = 7  # not a multiple of the processes


def _val_set():
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.randn(VAL, 3, H, W, generator=g),
                                          torch.randint(0, CLASSES, (VAL,), generator=g))


def _bn_model():
    """A backbone with BatchNorm: the fill in training mode depends on each chunk's statistics."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 6))
    return patchgd.PatchGDClassifier(backbone, CLASSES, patch_size=P, latent_dim=6)


def _eval_and_fill_worker(rank, out_dir):
    model = _bn_model()
    loader = torch.utils.data.DataLoader(distributed.eval_shard(_val_set()), batch_size=3)
    results = evaluate(model, loader, torch.device("cpu"), CLASSES)
    images = _val_set().tensors[0][:2]  # the same images on every process
    grid = model.train().grid(images)
    # 12 cells: chunks of 5, 5, 2 over 2 processes; or one chunk of 64, and nothing for rank 1 to encode.
    z = {chunk: distributed.parallel_fill(model, grid, chunk) for chunk in (5, 64)}
    torch.save({"eval": results, "z": z, "shard": len(loader.dataset)}, out_dir / f"eval-{rank}.pt")


@pytest.fixture(scope="module")
def two_process_eval_and_fill(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    spawn(_eval_and_fill_worker, out)
    # the workers' own results (not checkpoints) hold objects the safe loader refuses
    return [torch.load(out / f"eval-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_sharded_evaluation_counts_every_image_once_and_equals_one_process(two_process_eval_and_fill):
    expected = evaluate(_bn_model(), torch.utils.data.DataLoader(_val_set(), batch_size=3),
                        torch.device("cpu"), CLASSES)
    assert [r["shard"] for r in two_process_eval_and_fill] == [4, 3]
    for results in two_process_eval_and_fill:
        got = results["eval"]
        assert got["confusion"].sum() == VAL
        assert (got["confusion"] == expected["confusion"]).all()
        assert got["accuracy"] == expected["accuracy"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_parallel_fill_gives_the_single_process_z_bit_for_bit(two_process_eval_and_fill):
    model = _bn_model().train()
    for chunk in (5, 64):
        expected = model.fill_z(_val_set().tensors[0][:2], chunk)
        for results in two_process_eval_and_fill:
            assert torch.equal(results["z"][chunk], expected)


# --- fit(): one writer, resume -----------------------------------------------------------------------------

def _fit_config(data_dir, run_dir, method="patchgd"):
    return config_from_dict({
        "method": method, "output_dir": str(run_dir),
        "model": {"backbone": "test_resnet", "patch_size": 32, "latent_dim": 8, "in_chans": 1, "head_width": 8},
        "data": {"root": str(data_dir), "num_classes": 10},
        "train": {"epochs": 2, "batch_size": 2, "warmup_epochs": 1, "device": "cpu"},
    })


class Interrupted(Exception):
    """Stands for the kill of a run after its first epoch."""


def _fit_worker(rank, data_dir, root, phase):
    from patchgd.engine.trainer import fit

    if phase == "resume":
        fit(_fit_config(data_dir, root / "killed"), resume=root / "killed")
        return
    writes, logged, run_dir = [], [], str(root / "whole")

    def audit(event, args):  # every file a process opens for writing or renames in the run directory
        if event == "open" and str(args[0]).startswith(run_dir) and \
                (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
            writes.append(str(args[0]))
        elif event == "os.rename" and str(args[1]).startswith(run_dir):
            writes.append(str(args[1]))

    sys.addaudithook(audit)
    fit(_fit_config(data_dir, root / "whole"), log=logged.append)
    torch.save({"writes": list(writes), "logged": logged}, root / f"audit-{rank}.pt")

    def log_then_die(line):
        if line.startswith("epoch 1/"):
            raise Interrupted
    try:
        fit(_fit_config(data_dir, root / "killed"), log=log_then_die)
    except RuntimeError as err:
        # Rank 1 learns of rank 0's death as a closed gloo connection; say so as the same interruption, so
        # that whichever process spawn reports first, the expected failure is the one seen.
        if rank == 0 or "Connection closed" not in str(err):
            raise
        raise Interrupted from None


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    data_dir = root / "data"
    generate_ultramnist(data_dir, train=8, val=7, image_size=64, seed=0)
    with pytest.raises(mp.ProcessRaisedException, match="Interrupted"):
        spawn(_fit_worker, data_dir, root, "whole and killed")
    spawn(_fit_worker, data_dir, root, "resume")
    return root, data_dir


def _metrics(run_dir):
    import csv

    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_rank_zero_alone_writes_and_logs(fit_runs):
    root, _ = fit_runs
    rank0, rank1 = (torch.load(root / f"audit-{r}.pt") for r in range(WORLD))
    assert rank1["writes"] == [] and rank1["logged"] == []
    written = {os.path.basename(p) for p in rank0["writes"]}
    assert {"config.yaml", "metrics.csv", "last.pt", "best.pt", "eval.json", "learning_curves.png"} <= written
    assert any(line.startswith("epoch 2/2") for line in rank0["logged"])
    assert [row["epoch"] for row in _metrics(root / "whole")] == ["1", "2"]


def test_logged_accuracy_equals_single_process_evaluation_of_the_checkpoint(fit_runs):
    from patchgd.inference import load_model
    from patchgd.data.datasets import ImageCSVDataset

    root, data_dir = fit_runs
    model, cfg = load_model(root / "whole" / "last.pt", torch.device("cpu"))
    val = ImageCSVDataset(data_dir / "val.csv", None, num_classes=10, in_chans=1)
    results = evaluate(model, torch.utils.data.DataLoader(val, batch_size=3), torch.device("cpu"), 10)
    logged = _metrics(root / "whole")[-1]
    assert float(logged["val_accuracy"]) == results["accuracy"]
    assert float(logged["val_loss"]) == pytest.approx(results["loss"], rel=1e-5)


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(fit_runs):
    root, _ = fit_runs
    assert [row["epoch"] for row in _metrics(root / "killed")] == ["1", "2"]
    whole = load_checkpoint(root / "whole" / "last.pt")
    resumed = load_checkpoint(root / "killed" / "last.pt")
    assert resumed["epoch"] == whole["epoch"] == 2
    for name, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)


# --- the scaling benchmark ---------------------------------------------------------------------------------

def _scaling_worker(rank, out_dir):
    from benchmarks.__main__ import main

    assert main(["scaling", "--backbone", "test_resnet", "--patch-size", "32", "--latent-dim", "8", "--head-width",
                 "8", "--image-sizes", "64", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu", "--out", str(out_dir / f"rank{rank}")]) == 0


def test_scaling_benchmark_measures_two_processes_and_rank_zero_writes(tmp_path):
    import json

    spawn(_scaling_worker, tmp_path)
    assert not (tmp_path / "rank1").exists()
    (row,) = json.loads((tmp_path / "rank0" / "scaling.json").read_text())["results"]["sizes"]
    assert row["processes"] == 2
    assert row["images_per_s_n"] == pytest.approx(2 * 2 / row["step_together_s"])
    assert row["efficiency"] == pytest.approx(row["step_alone_s"] / row["step_together_s"])


# --- CUDA / NCCL ---------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA devices for 2 NCCL processes")
def test_nccl_processes_update_like_one_and_fill_in_parallel(tmp_path):
    mp.spawn(_nccl_entry, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    model, method = _build("patchgd eps=1")
    model.cuda()
    method = patchgd.create_method("patchgd", model, torch.optim.Adam(model.parameters(), lr=1e-2),
                                   inner_iterations=ZETA, grad_accum_steps=1)
    _train(method, "patchgd eps=1", [(i.cuda(), l.cuda(), [s.cuda() for s in sc]) for i, l, sc in _data()])
    for r in range(WORLD):
        got = torch.load(tmp_path / f"nccl-{r}.pt")
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["params"][name].cuda(), value, rtol=1e-4, atol=1e-6)
        assert torch.equal(got["z"], got["z_alone"])


def _nccl_entry(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD)
    try:
        model, method = _build("patchgd eps=1")
        model.cuda()
        method = patchgd.create_method("patchgd", model, torch.optim.Adam(model.parameters(), lr=1e-2),
                                       inner_iterations=ZETA, grad_accum_steps=1,
                                       wrap=distributed.ddp(torch.device("cuda", rank)))
        part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        _train(method, "patchgd eps=1", [(i.cuda(), l.cuda(), [s.cuda() for s in sc]) for i, l, sc in _data()],
               part)
        bn = _bn_model().cuda().train()
        images = _val_set().tensors[0][:2].cuda()
        z = distributed.parallel_fill(bn, bn.grid(images), chunk=5)
        torch.save({"params": {k: v.cpu() for k, v in model.state_dict().items()}, "z": z.cpu(),
                    "z_alone": bn.fill_z(images, 5).cpu()}, out_dir / f"nccl-{rank}.pt")
    finally:
        dist.destroy_process_group()


# --- a cached fill on two processes --------------------------------------------------------------------------

def _cached_config(data_dir, run_dir):
    cfg = _fit_config(data_dir, run_dir)
    return config_from_dict({**patchgd.config.config_to_dict(cfg),
                             "train": {**patchgd.config.config_to_dict(cfg)["train"], "log_every": 1},
                             "patchgd": {"fill": "cached", "store": "disk", "refresh": 2, "sampling": 0.5}})


def _cached_worker(rank, data_dir, root, phase):
    from patchgd.engine.trainer import fit

    if phase == "whole":
        fit(_cached_config(data_dir, root / "whole"))
    elif phase == "resume":
        fit(_cached_config(data_dir, root / "killed"), resume=root / "killed")
    else:
        def die_in_epoch_2(line):  # rank 0's progress line after epoch 2's first step: both ranks wrote the store
            if line.startswith("epoch 2: 1/"):
                raise Interrupted
        try:
            fit(_cached_config(data_dir, root / "killed"), log=die_in_epoch_2)
        except RuntimeError as err:
            if rank == 0 or "Connection closed" not in str(err):
                raise
            raise Interrupted from None


def test_two_processes_share_a_store_on_disk_and_resume_it_exactly(tmp_path):
    """Both processes read and write one store (each its own images); killed in the middle of an epoch and
    resumed, the run ends with the weights and the store of the run never killed."""
    import numpy as np

    data_dir = tmp_path / "data"
    generate_ultramnist(data_dir, train=8, val=4, image_size=64, seed=0)
    spawn(_cached_worker, data_dir, tmp_path, "whole")
    with pytest.raises(mp.ProcessRaisedException, match="Interrupted"):
        spawn(_cached_worker, data_dir, tmp_path, "killed")
    assert list((tmp_path / "killed" / "zstore").glob("journal-2-r*.bin"))  # epoch 2's writes to undo
    spawn(_cached_worker, data_dir, tmp_path, "resume")
    whole, killed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "killed"))
    for name, value in whole["model"].items():
        torch.testing.assert_close(killed["model"][name], value, rtol=0, atol=0, msg=name)
    stores = [tmp_path / name / "zstore" for name in ("whole", "killed")]
    for array in ("codes.npy", "stamps.npy"):
        assert np.array_equal(np.load(stores[0] / array), np.load(stores[1] / array)), array
    assert (np.load(stores[0] / "stamps.npy") >= 0).all()  # every training image filled, whichever process had it
    assert not list(stores[1].glob("journal-*"))
