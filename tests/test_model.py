import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import patchgd
from patchgd.model.heads import ConvHead, SafeBatchNorm2d

from helpers import TinyEncoder


def naive_fill(backbone, images, p, pad_value, latent_dim):
    """Algorithm 2 one patch at a time, with explicit padding."""
    b, c, h, w = images.shape
    m, n = -(-h // p), -(-w // p)
    padded = torch.full((b, c, m * p, n * p), pad_value)
    padded[:, :, :h, :w] = images
    z = torch.zeros(b, latent_dim, m, n)
    with torch.no_grad():
        for i in range(b):
            for r in range(m):
                for col in range(n):
                    z[i, :, r, col] = backbone(padded[i:i + 1, :, r * p:(r + 1) * p, col * p:(col + 1) * p])[0]
    return z


@pytest.mark.parametrize("fill_batch_size", [1, 5, 1000])
def test_fill_z_matches_naive_loop_on_non_square_padded_grid(fill_batch_size):
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=8), num_classes=4, patch_size=16, latent_dim=8,
                                      pad_value=0.5, fill_batch_size=fill_batch_size).eval()
    images = torch.randn(2, 3, 40, 70)  # 3 x 5 grid, both sides padded
    z = model.fill_z(images)
    assert z.shape == (2, 8, 3, 5)
    torch.testing.assert_close(z, naive_fill(model.backbone, images, 16, 0.5, 8), rtol=1e-5, atol=1e-6)


def test_forward_is_head_of_fill_z():
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=8), num_classes=4, patch_size=16,
                                      latent_dim=8).eval()
    images = torch.randn(2, 3, 48, 32)
    with torch.inference_mode():
        assert torch.equal(model(images), model.head(model.fill_z(images)))


def test_backbone_with_wrong_output_is_a_clear_error():
    model = patchgd.PatchGDClassifier(TinyEncoder(latent_dim=8), num_classes=4, patch_size=16, latent_dim=32)
    with pytest.raises(ValueError, match=r"expected \(\d+, 32\)"):
        model.fill_z(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4), (7, 5)])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_head_trains_on_every_grid_and_batch_one(grid, batch):
    head = ConvHead(8, 3, width=16).train()
    logits = head(torch.randn(batch, 8, *grid))
    assert logits.shape == (batch, 3)
    logits.sum().backward()


def test_safe_batchnorm_is_batchnorm_except_for_single_values():
    torch.manual_seed(0)
    safe, plain = SafeBatchNorm2d(4), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(safe(x), plain(x))
    torch.testing.assert_close(safe.running_mean, plain.running_mean)
    single = torch.randn(1, 4, 1, 1)
    before = safe.running_mean.clone()
    expected = (single - before.view(1, 4, 1, 1)) / torch.sqrt(safe.running_var.view(1, 4, 1, 1) + safe.eps)
    torch.testing.assert_close(safe(single), expected)
    assert torch.equal(safe.running_mean, before)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_head_on_one_cell_equals_the_strided_convolution_and_its_bf16_gradients_stay_finite(dims):
    """On a grid of one cell the head's strided convolutions give what torch's own give (float32), and their
    bfloat16 weight gradients stay finite, which torch's strided kernel does not guarantee on the CPU."""
    torch.manual_seed(0)
    head = ConvHead(8, 3, width=8, dims=dims)
    shape = (4, 8) + (1,) * dims
    for block in head.features:
        conv = block[0]
        plain = (nn.Conv1d if dims == 1 else nn.Conv2d)(8, 8, 3, stride=conv.stride, padding=1)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(shape)
        torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    for _ in range(1000):  # torch's own kernel: non-finite in 0.2 to 18 % of such calls (torch 2.14.1)
        conv = type(head.features[3][0])(8, 8, 3, stride=2, padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(shape))
        out.float().sum().backward()
        assert conv.weight.grad.isfinite().all()


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "convnextv2_atto", "deit_tiny_patch16_224"])
def test_paper_backbones_build_offline_and_train_a_step(name):
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier(name, num_classes=3, patch_size=64, latent_dim=32, head_width=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    images = torch.randn(2, 3, 64, 160)  # 1 x 3 grid, right column padded
    stats = patchgd.PatchGD(model, optimizer, sampling=0.5).step(images, torch.tensor([0, 2]))
    assert stats["inner_iterations"] == 2 and stats["patches_per_image"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))


def test_pretrained_loads_a_local_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = patchgd.PatchGDClassifier("test_resnet", num_classes=2, patch_size=32, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.features.state_dict()[key], value), key
    with pytest.raises(ValueError, match="missing.pth.*no such file"):
        patchgd.PatchGDClassifier("test_resnet", num_classes=2, patch_size=32,
                                  pretrained=str(tmp_path / "missing.pth"))


def test_unknown_backbone_and_head_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet_nope'"):
        patchgd.PatchGDClassifier("resnet_nope", num_classes=2, patch_size=32)
    with pytest.raises(ValueError, match="model.head='mlp': no such head"):
        patchgd.PatchGDClassifier(TinyEncoder(), num_classes=2, patch_size=32, latent_dim=8, head="mlp")


def test_vit_backbone_runs_at_the_patch_size():
    model = patchgd.PatchGDClassifier("test_vit", num_classes=2, patch_size=32, latent_dim=8, head_width=8)
    assert model.fill_z(torch.randn(1, 3, 64, 32)).shape == (1, 8, 2, 1)


def test_channels_last_gives_the_same_z():
    torch.manual_seed(0)
    model = patchgd.PatchGDClassifier("test_resnet", num_classes=2, patch_size=32, latent_dim=8).eval()
    images = torch.randn(1, 3, 64, 96)
    z = model.fill_z(images)
    model.channels_last = True
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model.fill_z(images), z, rtol=1e-4, atol=1e-5)


def test_gd_extended_uses_the_unpooled_map_and_the_conv_head():
    model = patchgd.GDExtendedClassifier("test_resnet", num_classes=3, head_width=16)
    assert isinstance(model.head, ConvHead)
    features = model.backbone.forward_features(torch.randn(1, 3, 64, 64))
    assert features.dim() == 4 and model.head.features[0][0].in_channels == features.shape[1]
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3)
    vit = patchgd.GDExtendedClassifier("test_vit", num_classes=3, img_size=64)
    with pytest.raises(ValueError, match="ViT has no spatial map"):
        vit(torch.randn(1, 3, 64, 64))


def test_gd_uses_the_backbones_own_classifier():
    torch.manual_seed(0)
    model = patchgd.GDClassifier("test_resnet", num_classes=5)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model(images), model.backbone(images))
    assert F.softmax(model(images), dim=1).shape == (2, 5)
