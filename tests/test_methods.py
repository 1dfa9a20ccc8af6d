import copy
import math

import pytest
import torch
import torch.nn.functional as F

import patchgd
from patchgd.model.heads import ConvHead
from patchgd.methods import sample_schedule

from helpers import TinyEncoder

P = 8  # patch size of the faithfulness tests


def make_model(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=num_classes, patch_size=P,
                                     latent_dim=6, head=ConvHead(6, num_classes, width=8, dropout=0.2))


def naive_algorithm1(backbone, head, optimizer, images, labels, schedule, eps):
    """Algorithm 1 written out with per-patch loops, independently of the library's code paths."""
    b, c, h, w = images.shape
    m, n = math.ceil(h / P), math.ceil(w / P)
    padded = torch.zeros(b, c, m * P, n * P)
    padded[:, :, :h, :w] = images

    def patch(i, cell):
        r, col = divmod(int(cell), n)
        return padded[i:i + 1, :, r * P:(r + 1) * P, col * P:(col + 1) * P]

    backbone.train()
    head.train()
    with torch.no_grad():  # Z-filling, Algorithm 2
        z = torch.zeros(b, backbone(patch(0, 0)).shape[1], m, n)
        for i in range(b):
            for cell in range(m * n):
                r, col = divmod(cell, n)
                z[i, :, r, col] = backbone(patch(i, cell))[0]

    optimizer.zero_grad()
    per_image = [idx if idx.dim() == 2 else idx.unsqueeze(0).repeat(b, 1) for idx in schedule]
    groups = [per_image[g:g + eps] for g in range(0, len(per_image), eps)]
    for group in groups:
        for idx in group:
            z_j = z.detach().clone()
            for i in range(b):
                for cell in idx[i]:
                    r, col = divmod(int(cell), n)
                    z_j[i, :, r, col] = backbone(patch(i, cell))[0]
            loss = F.cross_entropy(head(z_j), labels) / len(group)
            loss.backward()
            z = z_j.detach()
        optimizer.step()
        optimizer.zero_grad()


def random_schedule(generator, zeta, k, cells, batch, per_image):
    if per_image:
        return [torch.stack([torch.randperm(cells, generator=generator)[:k] for _ in range(batch)])
                for _ in range(zeta)]
    return [torch.randperm(cells, generator=generator)[:k] for _ in range(zeta)]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("eps", [1, 2, 5])  # ε = 1, a partial last group (5 = 2 + 2 + 1), ε = ζ
@pytest.mark.parametrize("per_image", [False, True])
def test_step_matches_naive_algorithm1(float64, optimizer_name, eps, per_image):
    zeta, k = 5, 4
    ours = make_model()
    theirs = copy.deepcopy(ours)
    make_optimizer = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                      "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[optimizer_name]
    trainer = patchgd.PatchGD(ours, make_optimizer(ours.parameters()), grad_accum_steps=eps)
    naive_optimizer = make_optimizer(list(theirs.backbone.parameters()) + list(theirs.head.parameters()))

    generator = torch.Generator().manual_seed(1)
    for batch_seed in (10, 11):  # two consecutive batches
        torch.manual_seed(batch_seed)
        images, labels = torch.randn(2, 3, 20, 30), torch.tensor([2, 0])  # 3 x 4 grid, padded
        schedule = random_schedule(generator, zeta, k, 12, 2, per_image)
        torch.manual_seed(batch_seed)  # the head's dropout draws the same masks in both
        stats = trainer.step(images, labels, schedule=schedule)
        torch.manual_seed(batch_seed)
        naive_algorithm1(theirs.backbone, theirs.head, naive_optimizer, images, labels, schedule, eps)
        assert stats["optimizer_steps"] == math.ceil(zeta / eps)

    # Batched and per-patch convolutions sum in different orders; Adam divides near-zero gradients by
    # their own size and lifts that float64 rounding to ~1e-9, still far below any algorithmic
    # difference (of the order of lr = 1e-2). SGD shows the rounding as it is.
    tolerance = {"sgd": 1e-9, "adam": 1e-7}[optimizer_name]
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=lambda detail, name=name: f"{name}: {detail}")
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=lambda detail, name=name: f"{name}: {detail}")


class RecordingEncoder(TinyEncoder):
    """Records, for every backbone call with gradients, which patches it saw (by their constant value)."""

    def __init__(self):
        super().__init__(in_chans=1, latent_dim=6)
        self.calls = []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.calls.append(x[:, 0, 0, 0].round().long().tolist())
        return super().forward(x)


def cell_labelled_images(batch, m, n):
    """Images whose patch (i, r, c) is filled with the number i * 100 + r * n + c."""
    values = torch.arange(batch * m * n, dtype=torch.float32).view(batch, m, n)
    values += torch.arange(batch).view(batch, 1, 1) * (100 - m * n)
    return values.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1)


@pytest.mark.parametrize("sampling, grid", [(0.25, (4, 4)), (0.5, (2, 3)), (1 / 3, (3, 3)), (1.0, (2, 2))])
def test_default_sampler_visits_every_cell_exactly_once(sampling, grid):
    m, n = grid
    encoder = RecordingEncoder()
    model = patchgd.PatchGDClassifier(encoder, num_classes=2, patch_size=P, latent_dim=6,
                                      head=ConvHead(6, 2, width=8))
    trainer = patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.01), sampling=sampling,
                              max_sampled=1.0, generator=torch.Generator().manual_seed(0))
    images = cell_labelled_images(3, m, n)
    stats = trainer.step(images, torch.tensor([0, 1, 0]))
    k = math.ceil(sampling * m * n)
    assert stats["inner_iterations"] == math.ceil(1 / sampling) and len(encoder.calls) == stats["inner_iterations"]
    for call in encoder.calls:
        assert len(call) == 3 * k
    for i in range(3):
        seen = sorted(v - i * 100 for call in encoder.calls for v in call if i * 100 <= v < (i + 1) * 100)
        assert seen == list(range(m * n)), f"image {i} visited {seen}"


def test_sampler_never_repeats_a_cell_within_a_chunk_or_before_all_were_visited():
    generator = torch.Generator().manual_seed(3)
    chunks = sample_schedule(batch_size=4, num_cells=10, k=3, inner_iterations=7, generator=generator)
    order = torch.cat(chunks, dim=1)  # (4, 21)
    for row in order.tolist():
        assert sorted(row[:10]) == list(range(10))
        assert sorted(row[10:20]) == list(range(10))
    for chunk in chunks:
        assert all(len(set(row)) == 3 for row in chunk.tolist())


def test_only_sampled_cells_receive_gradients():
    model = patchgd.PatchGDClassifier(TinyEncoder(in_chans=1, latent_dim=6), num_classes=2, patch_size=P,
                                      latent_dim=6, head=ConvHead(6, 2, width=8))
    images = torch.randn(2, 1, 3 * P, 4 * P, requires_grad=True)
    schedule = [torch.tensor([[1, 6], [11, 0]])]
    patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.01)).step(images, torch.tensor([0, 1]),
                                                                            schedule=schedule)
    touched = images.grad.abs().view(2, 3, P, 4, P).sum(dim=(2, 4)) > 0  # (B, m, n)
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    for i, cells in enumerate(schedule[0].tolist()):
        for cell in cells:
            expected[i, cell // 4, cell % 4] = True
    assert torch.equal(touched, expected)


def test_fill_mode_eval_keeps_batchnorm_statistics_of_the_fill_out():
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier("test_resnet", num_classes=2, patch_size=32, latent_dim=8, head_width=8)
    stats_of = lambda m: torch.cat([b.flatten() for n, b in m.backbone.named_buffers() if "running_mean" in n])
    images, labels = torch.randn(1, 3, 64, 64), torch.tensor([1])
    runs = {}
    for mode in ("train", "eval"):
        trial = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trial.parameters(), lr=0.0)  # lr 0: only BatchNorm statistics move
        patchgd.PatchGD(trial, optimizer, fill_mode=mode).step(images, labels, schedule=[torch.tensor([0, 3])])
        runs[mode] = stats_of(trial)
    assert not torch.allclose(runs["train"], runs["eval"])
    # eval fill: statistics move only in the single inner iteration, as for one forward of its patches
    single = copy.deepcopy(model).train()
    single.encode(model.grid(images).patches(torch.tensor([[0, 3]])))
    torch.testing.assert_close(runs["eval"], stats_of(single))


@pytest.mark.parametrize("method", ["gd", "gd-extended"])
def test_gd_baselines_train_a_step(method):
    torch.manual_seed(0)
    model = patchgd.create_model(method, "test_resnet", num_classes=3, head_width=16)
    before = [p.detach().clone() for p in model.parameters()]
    step = patchgd.create_method(method, model, torch.optim.Adam(model.parameters(), lr=1e-3))
    stats = step.step(torch.randn(2, 3, 64, 96), torch.tensor([0, 2]))
    assert math.isfinite(stats["loss"]) and stats["optimizer_steps"] == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.requires_grad)


def naive_micro_batched_gd(model, optimizer, images, labels, micro):
    """GD with gradient accumulation written out: each micro-batch's mean loss, weighted by its share of
    the batch, backpropagated in turn; one optimizer step."""
    optimizer.zero_grad()
    for first in range(0, len(labels), micro):
        x, y = images[first:first + micro], labels[first:first + micro]
        (F.cross_entropy(model(x), y) * len(y) / len(labels)).backward()
    optimizer.step()


@pytest.mark.parametrize("micro", [1, 2, 5])
def test_gd_micro_batches_update_like_the_whole_batch(float64, micro):
    # Without BatchNorm the accumulated micro-batch gradients are the whole batch's mean gradient.
    torch.manual_seed(0)
    ours = patchgd.GDClassifier(TinyEncoder(latent_dim=3), 3)
    theirs = copy.deepcopy(ours)
    images, labels = torch.randn(5, 3, 16, 16), torch.tensor([0, 2, 1, 1, 0])
    step = patchgd.create_method("gd", ours, torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                                 micro_batch_size=micro)
    whole_batch = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        stats = step.step(images, labels)
        naive_micro_batched_gd(theirs, whole_batch, images, labels, micro=len(labels))
    assert stats["micro_batches"] == -(-5 // micro)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_gd_micro_batches_with_batchnorm_match_the_naive_accumulation(float64):
    # With BatchNorm each micro-batch is normalised on its own statistics, as in the paper's accumulation
    # (a last micro-batch of 1 image would leave BatchNorm one value per channel, so 6 = 2 + 2 + 2).
    torch.manual_seed(0)
    ours = patchgd.create_model("gd-extended", "test_resnet", num_classes=3, head_width=8, head_dropout=0.0)
    theirs = copy.deepcopy(ours)
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 2, 1, 1, 0, 2])
    step = patchgd.create_method("gd-extended", ours, torch.optim.Adam(ours.parameters(), lr=1e-3),
                                 micro_batch_size=2)
    naive = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    theirs.train()
    for _ in range(2):
        step.step(images, labels)
        naive_micro_batched_gd(theirs, naive, images, labels, micro=2)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)  # weights and BatchNorm statistics
    whole = copy.deepcopy(theirs)
    patchgd.create_method("gd-extended", whole, torch.optim.Adam(whole.parameters(), lr=1e-3)).step(images, labels)
    step.step(images, labels)
    assert not torch.allclose(whole.state_dict()["backbone.bn1.running_mean"],
                              ours.state_dict()["backbone.bn1.running_mean"])


def test_micro_batches_are_for_gd_only():
    with pytest.raises(ValueError, match="train.micro_batch_size splits the batches of gd"):
        patchgd.create_method("patchgd", make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1),
                              micro_batch_size=2)


def test_bf16_autocast_step_runs_on_cpu():
    model = make_model()
    stats = patchgd.PatchGD(model, torch.optim.Adam(model.parameters()), amp="bf16").step(
        torch.randn(2, 3, 16, 24), torch.tensor([0, 1]))
    assert math.isfinite(stats["loss"])


def make_trainer(**kwargs):
    model = make_model()
    return patchgd.PatchGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"sampling": 0.0}, r"sampling must be a fraction in \(0, 1\], got 0.0"),
    ({"sampling": 1.5}, r"sampling must be a fraction in \(0, 1\], got 1.5"),
    ({"max_sampled": 0}, "max_sampled must be a positive"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be a positive integer"),
    ({"inner_iterations": 2.5}, "inner_iterations must be a positive integer"),
    ({"fill_mode": "test"}, "fill_mode must be 'train' or 'eval'"),
    ({"amp": "fp16"}, "fp16.*needs a CUDA device"),
    ({"amp": "int8"}, "amp must be one of"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(**kwargs)


@pytest.mark.parametrize("schedule, labels, message", [
    ([torch.tensor([0, 12])], [0, 1], r"cell index 12, outside the 3x4 grid \(expected 0..11\)"),
    ([torch.tensor([-1])], [0, 1], "cell index -1"),
    ([torch.arange(13) % 12], [0, 1], "asks for 13 patches per image but the grid has 3x4 = 12 cells"),
    ([torch.tensor([3, 3])], [0, 1], "repeats a cell"),
    ([torch.tensor([[0, 1]] * 3)], [0, 1], r"shape \(k,\) or \(2, k\)"),
    ([torch.tensor([0.0])], [0, 1], "integer tensor"),
    ([], [0, 1], "schedule is empty"),
    (None, [0, 3], r"label 3 is outside the 3 classes \(expected 0..2\)"),
    (None, [0, -1], "label -1 is outside"),
    (None, [0], "labels must be 2 integer class indices"),
])
def test_bad_step_input_is_a_clear_error(schedule, labels, message):
    with pytest.raises(ValueError, match=message):
        make_trainer().step(torch.randn(2, 3, 20, 30), torch.tensor(labels), schedule=schedule)


def test_schedule_length_must_match_inner_iterations():
    with pytest.raises(ValueError, match="schedule has 1 entries but inner_iterations=2"):
        make_trainer(inner_iterations=2).step(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]),
                                              schedule=[torch.tensor([0])])


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="method='sgd': no such method"):
        patchgd.create_model("sgd", "test_resnet", 2)


def test_k_and_zeta_ignore_float_noise():
    from patchgd.methods import default_inner_iterations, patches_per_iteration

    assert patches_per_iteration(0.28, 25) == 7  # 0.28 * 25 = 7.000000000000001 in floats
    assert patches_per_iteration(7 / 25, 25) == 7
    assert patches_per_iteration(0.25, 10) == 3
    assert default_inner_iterations(0.3, 0.9) == 3  # 0.9 / 0.3 = 3.0000000000000004
    assert default_inner_iterations(0.3, 1.0) == 4


def test_patches_per_step_is_an_absolute_k_and_matches_naive_algorithm1(float64):
    """k = patches_per_step whatever the grid, ζ = ceil(max_sampled * m * n / k); the step equals the naive
    loop on the schedule the default sampler draws with that k and ζ."""
    k, cells = 5, 12  # 20 x 30 images: a 3 x 4 grid
    zeta = math.ceil(cells / k)
    ours = make_model()
    theirs = copy.deepcopy(ours)
    trainer = patchgd.PatchGD(ours, torch.optim.SGD(ours.parameters(), lr=0.1), patches_per_step=k,
                              generator=torch.Generator().manual_seed(3))
    naive_optimizer = torch.optim.SGD(list(theirs.backbone.parameters()) + list(theirs.head.parameters()), lr=0.1)
    torch.manual_seed(10)
    images, labels = torch.randn(2, 3, 20, 30), torch.tensor([2, 0])
    schedule = sample_schedule(2, cells, k, zeta, torch.Generator().manual_seed(3))
    torch.manual_seed(10)
    stats = trainer.step(images, labels)
    torch.manual_seed(10)
    naive_algorithm1(theirs.backbone, theirs.head, naive_optimizer, images, labels, schedule, zeta)
    assert (stats["patches_per_image"], stats["inner_iterations"]) == (k, zeta)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # a larger image keeps k (and so the memory of an inner iteration); more inner iterations cover it
    stats = trainer.step(torch.randn(1, 3, 48, 64), torch.tensor([1]))
    assert (stats["patches_per_image"], stats["inner_iterations"]) == (k, math.ceil(48 / k))
    # k is capped by the grid
    assert trainer.step(torch.randn(1, 3, 16, 16), torch.tensor([1]))["patches_per_image"] == 4
