"""The attention-MIL head: padded cells ignored, blind to position by design, the exact PatchGD step through
it (any grid and sequences: test_transformer_head.py)."""

import copy
import math

import pytest
import torch

import patchgd
from patchgd.model.heads import AttentionMILHead

from helpers import TinyEncoder
from test_methods import P, naive_algorithm1, random_schedule


def make_head(**options):
    torch.manual_seed(0)
    return AttentionMILHead(12, 3, width=16, **options).eval()


def test_attention_weights_sum_to_one_and_padded_cells_get_none():
    head = make_head()
    small = [torch.randn(1, 12, 2, 3), torch.randn(1, 12, 4, 2)]
    padded, mask = torch.zeros(2, 12, 4, 3), torch.zeros(2, 1, 4, 3)
    padded[0, :, :2, :3], mask[0, :, :2, :3] = small[0][0], 1
    padded[1, :, :4, :2], mask[1, :, :4, :2] = small[1][0], 1
    padded[mask.expand_as(padded) == 0] = 100.0  # whatever the padding holds must not matter
    torch.testing.assert_close(head(padded, mask=mask), torch.cat([head(z) for z in small]), rtol=1e-5, atol=1e-5)
    _, weights = head.attention(padded, mask)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert (weights[mask.flatten(1) == 0] == 0).all()


def test_a_bag_of_cells_ignores_where_each_cell_is():
    head = make_head()
    z = torch.randn(1, 12, 3, 4)
    shuffled = z.flatten(2)[:, :, torch.randperm(12)].view_as(z)
    torch.testing.assert_close(head(shuffled), head(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [1, 3])
def test_patchgd_step_through_the_attention_head_matches_naive_algorithm1(float64, eps):
    torch.manual_seed(0)
    ours = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=6), num_classes=3, patch_size=P, latent_dim=6,
                                     head=AttentionMILHead(6, 3, width=8, dropout=0.2))
    theirs = copy.deepcopy(ours)
    trainer = patchgd.PatchGD(ours, torch.optim.Adam(ours.parameters(), lr=1e-2), grad_accum_steps=eps)
    naive_optimizer = torch.optim.Adam(list(theirs.backbone.parameters()) + list(theirs.head.parameters()), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for batch_seed in (10, 11):
        images, labels = torch.randn(2, 3, 20, 30), torch.tensor([2, 0])
        schedule = random_schedule(generator, 3, 4, 12, 2, per_image=True)
        torch.manual_seed(batch_seed)  # the head's dropout draws the same masks in both
        stats = trainer.step(images, labels, schedule=schedule)
        torch.manual_seed(batch_seed)
        naive_algorithm1(theirs.backbone, theirs.head, naive_optimizer, images, labels, schedule, eps)
        assert stats["optimizer_steps"] == math.ceil(3 / eps)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7, msg=lambda detail, name=name: f"{name}: {detail}")
