"""The PatchGD classifier: a patch backbone filling a latent grid ``Z``, and a head classifying ``Z``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..config import Config, ModelConfig
from ..data.lazy import LazyImage, SourceGrid, cell_mask
from ..grid import PatchGrid
from ..normalize import Normalize
from .fill import Fill
from .backbones import Conv1dEncoder, PatchEncoder, create_timm
from .heads import ConvHead, build_head
from .pretrained import encoder_normalization, resolve_encoder


__all__ = ["PatchGDClassifier", "GDClassifier", "GDExtendedClassifier"]

_DEFAULT = ModelConfig()  # every default below is the config's: one home for each


def _encoder_options(cfg: Config) -> dict[str, Any]:
    """The keyword arguments every classifier's encoder takes, from a config."""
    m = cfg.model
    return dict(in_chans=m.in_chans, backbone_args=m.backbone_args, freeze=m.freeze,
                grad_checkpointing=m.grad_checkpointing, channels_last=m.channels_last, mean=cfg.data.mean,
                std=cfg.data.std)


def _timm_encoder(backbone: str, pretrained: bool | str | dict | None, in_chans: int, mean, std):
    """The origin record of a timm backbone (``pretrained`` resolved, or already a record) and the
    normalisation to use: ``mean``/``std`` as given, else those the weights were trained with."""
    origin = pretrained if isinstance(pretrained, dict) else resolve_encoder(backbone, pretrained)
    own_mean, own_std = encoder_normalization(origin, in_chans)
    return origin, (own_mean if mean is None else mean), (own_std if std is None else std)


class PatchGDClassifier(nn.Module):
    """Backbone ``f_θ1`` (patch -> ``s`` features) and head ``g_θ2`` (``Z`` -> logits).

    Sequences ``(B, C, L)`` go through the same code as images: cut into chunks of ``patch_size``
    samples, they fill a ``(B, s, n)`` grid ``Z`` (a ``"conv1d"`` backbone and head, or any modules).

    Args:
        backbone: A timm model name (its pooled features get a linear projection to ``latent_dim``),
            ``"conv1d"`` (:class:`~patchgd.backbones.Conv1dEncoder`, for sequences) or any module mapping
            ``(N, C, p, p)`` (``(N, C, p)`` for sequences) to ``(N, latent_dim)``.
        num_classes: Number of classes.
        patch_size: Side ``p`` of the square patches (chunk length of sequences).
        latent_dim: Latent size ``s`` of each cell of ``Z``.
        head: A head's name in :data:`patchgd.registry.HEADS` (``"conv"``, the paper's; ``"conv1d"``, the same
            over sequences; ``"transformer"``; ``"attention"``, gated attention-MIL pooling; ``"mean"``; or
            one registered with :func:`patchgd.register_head`), or any module mapping ``Z`` to logits.
        head_args: Keyword arguments of a named head, on top of ``head_width`` and the rest
            (:func:`~patchgd.model.heads.build_head`).
        in_chans: Image channels (for a timm backbone and the normalisation).
        pretrained: For a timm backbone: ``True`` (the name's default pretrained tag, or a hub
            repository's weights), a local weights file or snapshot folder, ``False``, None (true for an
            ``hf-hub:`` name) or an origin record of :func:`patchgd.pretrained.resolve_encoder`.
        backbone_args: Extra ``timm.create_model`` arguments of a timm backbone.
        freeze: Freeze a timm backbone: None, ``"all"`` or its stem and first N stages/blocks
            (:func:`~patchgd.backbones.freeze_encoder`); the projection to ``latent_dim`` always trains.
        grad_checkpointing: Recompute the timm backbone's activations in backward (less memory, same update).
        pad_value: Pixel value (in the images' own units, e.g. 0-255 for uint8) that pads images whose sides
            are not multiples of ``patch_size``; a patch of it is the "blank patch" whose code fills the
            background cells of a tissue mask.
        fill_batch_size: Patches per backbone call in :meth:`fill_z` (``patchgd.fill_batch_size``); None (the
            default) follows :func:`~patchgd.model.fill.fill_chunk`: one grid row of every image per call.
        head_width: Channels of the conv head; token width of the transformer head; width of the attention head.
        head_dropout: Dropout probability of the head.
        head_depth: Encoder layers of the transformer head.
        head_heads: Attention heads of the transformer head.
        channels_last: Feed patches to the backbone in channels-last memory format.
        mean: Per-channel mean of the [0, 1]-scaled pixels, subtracted on the device (None: the pretrained
            weights' own, else 0).
        std: Per-channel standard deviation divided by on the device (None: the weights' own, else 1).
        fill_workers: DataLoader worker processes that read patches from disk-backed sources while the
            backbone fills ``Z`` (0 reads in this process).

    Example:
        >>> model = PatchGDClassifier("test_resnet", num_classes=10, patch_size=32, latent_dim=16)
        >>> model.fill_z(torch.randn(2, 3, 64, 96)).shape
        torch.Size([2, 16, 2, 3])
        >>> model = PatchGDClassifier("conv1d", num_classes=4, patch_size=10, latent_dim=16, head="conv1d",
        ...                           in_chans=6)
        >>> model.fill_z(torch.randn(2, 6, 100)).shape
        torch.Size([2, 16, 10])
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, patch_size: int,
                 latent_dim: int = _DEFAULT.latent_dim, head: str | nn.Module = _DEFAULT.head, *,
                 head_args: dict[str, Any] | None = None, in_chans: int = _DEFAULT.in_chans,
                 pretrained: bool | str | dict | None = None, backbone_args: dict | None = None,
                 freeze: str | int | None = None, grad_checkpointing: bool = False, pad_value: float = 0.0,
                 fill_batch_size: int | None = None, head_width: int = _DEFAULT.head_width,
                 head_dropout: float = _DEFAULT.head_dropout, head_depth: int = _DEFAULT.head_depth,
                 head_heads: int = _DEFAULT.head_heads, channels_last: bool = False,
                 mean: list[float] | None = None, std: list[float] | None = None, fill_workers: int = 0):
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if fill_batch_size is not None and fill_batch_size <= 0:
            raise ValueError(f"fill_batch_size must be positive, got {fill_batch_size}")
        self.origin = None
        if isinstance(backbone, str) and backbone != "conv1d":
            self.origin, mean, std = _timm_encoder(backbone, pretrained, in_chans, mean, std)
            backbone = PatchEncoder(backbone, latent_dim, patch_size, in_chans=in_chans, origin=self.origin,
                                    backbone_args=backbone_args, freeze=freeze, grad_checkpointing=grad_checkpointing)
        elif pretrained not in (None, False) or backbone_args or freeze is not None or grad_checkpointing:
            raise ValueError("pretrained, backbone_args, freeze and grad_checkpointing apply to a timm backbone "
                             "name; set up your own module yourself")
        if isinstance(backbone, str):
            backbone = Conv1dEncoder(in_chans, latent_dim)
        if isinstance(head, str):
            head = build_head(head, latent_dim, num_classes, width=head_width, dropout=head_dropout,
                              depth=head_depth, heads=head_heads, head_args=head_args)
        self.normalize = Normalize(in_chans, mean, std)
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.latent_dim = latent_dim
        self.pad_value = pad_value
        self.fill_batch_size = fill_batch_size
        self.fill_workers = fill_workers
        self.channels_last = channels_last

    @classmethod
    def from_config(cls, cfg: Config, pretrained: bool | str | dict | None) -> PatchGDClassifier:
        """The model of ``cfg`` (``model.*``; the pixels' ``data.mean``/``std``/``pad_value``; the fill's
        ``data.num_workers`` and ``patchgd.fill_batch_size``), with ``pretrained`` resolved."""
        m = cfg.model
        return cls(m.backbone, cfg.data.num_classes, m.patch_size, m.latent_dim, m.head, head_args=m.head_args,
                   pretrained=pretrained, pad_value=cfg.data.pad_value, fill_batch_size=cfg.patchgd.fill_batch_size,
                   head_width=m.head_width, head_dropout=m.head_dropout, head_depth=m.head_depth,
                   head_heads=m.head_heads, fill_workers=cfg.data.num_workers, **_encoder_options(cfg))

    @property
    def device(self) -> torch.device:
        return self.normalize.mean.device

    def grid(self, images: torch.Tensor | Sequence[torch.Tensor | LazyImage]) -> PatchGrid | SourceGrid:
        """The patch grid of ``images`` under this model's patch size and padding.

        Args:
            images: A ``(B, C, H, W)`` tensor (a view of it is cut; ``(B, C, L)`` sequences too), or one
                item per image: ``(C, H, W)`` tensors and :class:`~patchgd.data.lazy.LazyImage` s (read in
                pieces), of any sizes.
        """
        if isinstance(images, torch.Tensor):
            return PatchGrid(images, self.patch_size, self.pad_value)
        return SourceGrid(images, self.patch_size, self.pad_value, device=self.device)

    def _prepare(self, patches: torch.Tensor) -> torch.Tensor:
        patches = self.normalize(patches.to(self.device, non_blocking=True))
        return patches.contiguous(memory_format=torch.channels_last) if self.channels_last else patches

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of patches ``(N, C, p, p)`` or chunks ``(N, C, p)`` (integer pixels or floats) on
        the model's device and run the backbone -> ``(N, s)``."""
        patches = self._prepare(patches)
        out = self.backbone(patches)
        if out.shape != (patches.shape[0], self.latent_dim):
            raise ValueError(f"backbone returned shape {tuple(out.shape)} for {patches.shape[0]} patches; "
                             f"expected ({patches.shape[0]}, {self.latent_dim}) (N, latent_dim)")
        return out

    @property
    def feature_dim(self) -> int | None:
        """Width of the timm encoder's pooled features, before the projection to ``s`` (None for a backbone
        of one's own): what a persistent ``Z`` stores when the encoder is frozen."""
        return self.backbone.features.num_features if isinstance(self.backbone, PatchEncoder) else None

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The timm encoder's pooled features of a batch of patches, before the projection: ``(N, D)``."""
        return self.backbone.features(self._prepare(patches))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, s)`` of encoder features ``(N, D)``: the trainable projection."""
        return self.backbone.proj(features)

    def fill_z(self, images: torch.Tensor | Sequence | PatchGrid | SourceGrid, batch_size: int | None = None, *,
               shard: tuple[int, int] = (0, 1), features: bool = False) -> torch.Tensor:
        """Algorithm 2: encode every patch without gradients and place it in its cell of ``Z``: this model's
        :class:`~patchgd.model.fill.Fill` (its chunks of at most ``batch_size`` patches, default
        :func:`~patchgd.model.fill.fill_chunk`, its reader workers ``fill_workers``), which see the
        arguments.

        Returns:
            ``Z`` of shape ``(B, s, m, n)`` (``(B, s, n)`` for sequences) in the default dtype (float32
            under mixed precision too), cells in row-major order.
        """
        return Fill(self)(images, batch_size, shard=shard, features=features)

    def background_code(self, grid: PatchGrid | SourceGrid) -> torch.Tensor:
        """The code of every background cell: the encoding of one blank patch (all ``pad_value``), shaped
        like the grid's patches (a chunk for sequences). Occlusion heatmaps (:mod:`patchgd.explain`) use it too.

        It is computed once per fill, without gradients and with the backbone in eval mode (a lone
        constant patch has no meaningful batch statistics, and must not move BatchNorm's running ones),
        so it is a constant of the inner iterations: background cells are never sampled, and no gradient
        reaches the backbone through them; the head's gradient still sees them as inputs.
        """
        blank = torch.full((1, grid.channels, *grid.patch_shape), self.pad_value, dtype=grid.dtype)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                return self.encode(blank)[0]
        finally:
            self.backbone.train(was_training)

    def classify(self, z: torch.Tensor, cell_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head on ``Z``; ``cell_mask`` ``(B, 1, m, n)`` marks the cells of a padded batch's images.

        Args:
            z: ``(B, s, m, n)``.
            cell_mask: None when every image fills the grid (the head is called exactly as
                ``head(z)``); otherwise a float mask the head must accept as ``head(z, mask=...)``.
        """
        if cell_mask is None:
            return self.head(z)
        if "mask" not in inspect.signature(self.head.forward).parameters:
            raise ValueError(f"the head {type(self.head).__name__} takes no cell mask, which a batch of images "
                             "of different sizes needs; use head='conv' or a head with forward(z, mask)")
        return self.head(z, mask=cell_mask)

    def forward(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """Inference (Fig. 3b of the paper): the head on ``fill_z(images)``."""
        grid = self.grid(images)
        return self.classify(self.fill_z(grid), cell_mask(grid))


class GDClassifier(nn.Module):
    """The GD baseline: a backbone with its own classifier on the whole image.

    Args:
        backbone: A timm model name, or any module mapping ``(B, C, H, W)`` to logits.
        num_classes: Number of classes.
        in_chans: Image channels (for a timm backbone).
        pretrained: Pretrained weights of a timm backbone, as for :class:`PatchGDClassifier`.
        backbone_args: Extra ``timm.create_model`` arguments.
        freeze: None, ``"all"`` or the stem and first N stages/blocks (the classifier always trains).
        grad_checkpointing: Gradient checkpointing in the backbone.
        img_size: Input size, for backbones built for one (ViTs).
        channels_last: Feed images in channels-last memory format.
        mean: Per-channel mean of the [0, 1]-scaled pixels, subtracted on the device (None: the pretrained
            weights' own, else none).
        std: Per-channel standard deviation, as ``mean``.
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, *, in_chans: int = 3,
                 pretrained: bool | str | dict | None = None, backbone_args: dict | None = None,
                 freeze: str | int | None = None, grad_checkpointing: bool = False, img_size: int | None = None,
                 channels_last: bool = False, mean: list[float] | None = None, std: list[float] | None = None,
                 **timm_kwargs):
        super().__init__()
        self.origin = None
        if isinstance(backbone, str):
            self.origin, mean, std = _timm_encoder(backbone, pretrained, in_chans, mean, std)
            backbone = create_timm(backbone, in_chans=in_chans, num_classes=num_classes, img_size=img_size,
                                   origin=self.origin, backbone_args=backbone_args, freeze=freeze,
                                   grad_checkpointing=grad_checkpointing, **timm_kwargs)
        self.normalize = Normalize(in_chans, mean, std)
        self.backbone = backbone
        self.num_classes = num_classes
        self.channels_last = channels_last

    @classmethod
    def from_config(cls, cfg: Config, pretrained: bool | str | dict | None) -> GDClassifier:
        """The model of ``cfg`` (``model.*``, ``data.image_size`` for backbones built for one size, the pixels'
        ``data.mean``/``std``), with ``pretrained`` resolved."""
        return cls(cfg.model.backbone, cfg.data.num_classes, pretrained=pretrained, img_size=cfg.data.image_size,
                   **_encoder_options(cfg))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Whole images (integer pixels or floats) -> normalised floats in the backbone's memory format."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{type(self).__name__} needs whole images as one (B, C, H, W) tensor; a batch of "
                             "images read in pieces (slides) or of different sizes needs method patchgd, or "
                             "data.image_size to read every image whole at one size")
        images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prepare(images))


class GDExtendedClassifier(GDClassifier):
    """The GD-extended baseline: the backbone's unpooled feature map, then the same kind of head as PatchGD.

    It is the paper's control for the head's extra parameters: a CNN's last feature map plays the role
    of ``Z``.

    Args:
        backbone: A timm model name (a CNN: ``forward_features`` must return a ``(B, C, h, w)`` map), or any
            module mapping images to such a map, with ``feature_dim`` giving ``C``.
        num_classes: Number of classes.
        feature_dim: Channels of a custom module's feature map (read from timm otherwise).
        head: ``"conv"`` for the paper's head, or any module mapping the feature map to logits.
        head_width: Channels of the conv head.
        head_dropout: Dropout2d probability of the conv head.
        **encoder: ``in_chans``, ``pretrained``, ``backbone_args``, ``freeze``, ``grad_checkpointing``,
            ``img_size``, ``channels_last``, ``mean``, ``std``: as for :class:`GDClassifier`.
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, *, feature_dim: int | None = None,
                 head: str | nn.Module = "conv", head_width: int = _DEFAULT.head_width,
                 head_dropout: float = _DEFAULT.head_dropout, **encoder: Any):
        if isinstance(backbone, str):
            # The unpooled map: no classifier, no pooling.
            super().__init__(backbone, 0, global_pool="", **encoder)
            self.num_classes = num_classes
            feature_dim = self.backbone.num_features
        elif feature_dim is None:
            raise ValueError("a custom GD-extended backbone needs feature_dim (channels of its feature map)")
        else:
            super().__init__(backbone, num_classes, **encoder)
        self.head = ConvHead(feature_dim, num_classes, head_width, head_dropout) if head == "conv" else head

    @classmethod
    def from_config(cls, cfg: Config, pretrained: bool | str | dict | None) -> GDExtendedClassifier:
        """As :meth:`GDClassifier.from_config`, with the conv head's ``model.head_width`` and ``head_dropout``."""
        return cls(cfg.model.backbone, cfg.data.num_classes, pretrained=pretrained, img_size=cfg.data.image_size,
                   head_width=cfg.model.head_width, head_dropout=cfg.model.head_dropout, **_encoder_options(cfg))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.prepare(images)
        features = self.backbone.forward_features(images) if hasattr(self.backbone, "forward_features") \
            else self.backbone(images)
        if features.dim() != 4:
            raise ValueError(f"GD-extended needs a (B, C, h, w) feature map; the backbone gave shape "
                             f"{tuple(features.shape)} (a ViT has no spatial map: use a CNN)")
        return self.head(features)
