"""The files of per-cell evidence: ``NAME_heatmap.png`` (the evidence drawn over the image or its
thumbnail), ``.npy`` and ``.csv``, ``NAME_z.png`` (``Z`` by its principal components) and, for a slide,
``NAME.geojson`` for QuPath; :func:`write_evidence` explains a batch (:mod:`patchgd.explain`) and writes them."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .explain import Evidence, explain, z_to_rgb
from .data.lazy import LazyImage
from .io import atomic_file
from .model import PatchGDClassifier

__all__ = ["save_geojson", "save_heatmap", "save_z_image", "write_evidence"]


def _thumbnail(image: torch.Tensor, max_side: int) -> np.ndarray:
    """``(C, H, W)`` pixels in [0, 1] -> an ``(h, w)`` or ``(h, w, 3)`` array whose longer side is at most ``max_side``."""
    scale = max_side / max(image.shape[1:])
    if scale < 1:
        size = [max(1, round(side * scale)) for side in image.shape[1:]]
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    pixels = image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def _save_figure(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def save_heatmap(out_dir: str | Path, name: str, display: torch.Tensor, scores: torch.Tensor, patch_size: int,
                 title: str, max_side: int = 768, image_width: int | None = None) -> list[Path]:
    """Write ``NAME_heatmap.png`` (the evidence over the image), ``.npy`` and ``.csv`` (row, col, score).

    Args:
        out_dir: Folder to write into (created if needed).
        name: File stem.
        display: What to draw the evidence on: ``(C, H, W)`` pixels in [0, 1] (a thumbnail of at most
            ``max_side`` px is drawn), or a ``(C, L)`` sequence (its channels as lines).
        scores: ``(m, n)`` or ``(n,)`` per-cell evidence of one image.
        patch_size: Cell side in pixels (samples), to place the cells on the image.
        title: The figure's title (the prediction).
        max_side: Longest side of the drawn thumbnail.
        image_width: Width in pixels of the image the scores are about, when ``display`` is a smaller
            picture of it (a slide's thumbnail); default: the width of ``display``.

    Returns:
        The written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    grid = scores.detach().float().cpu().numpy()
    limit = float(np.abs(grid).max()) or 1.0
    style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit)
    if display.dim() == 3:
        picture = _thumbnail(display, max_side)
        scale = picture.shape[1] / (image_width or display.shape[2])
        rows, cols = grid.shape
        fig, ax = plt.subplots(figsize=(7, 7 * picture.shape[0] / picture.shape[1] + 0.6))
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                  extent=(0, picture.shape[1], picture.shape[0], 0))
        # Cells with little evidence stay see-through, so the image shows where nothing is claimed.
        alpha = 0.1 + 0.6 * np.abs(grid) / limit
        shown = ax.imshow(grid, extent=(0, cols * patch_size * scale, rows * patch_size * scale, 0), alpha=alpha,
                          interpolation="nearest", **style)
        ax.set_xlim(0, picture.shape[1])
        ax.set_ylim(picture.shape[0], 0)
        ax.set_axis_off()
    else:
        series = display.detach().float().cpu().numpy()
        fig, ax = plt.subplots(figsize=(9, 3.5))
        length = grid.shape[-1] * patch_size
        shown = ax.imshow(grid.reshape(1, -1), extent=(0, length, series.min(), series.max()), aspect="auto",
                          alpha=0.45, interpolation="nearest", **style)
        for channel in series:
            ax.plot(np.arange(len(channel)), channel, lw=0.8)
        ax.set_xlim(0, length)
        ax.set_xlabel("time step")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="evidence for the class")
    ax.set_title(title, fontsize=10)
    paths = [out_dir / f"{name}_heatmap.png", out_dir / f"{name}_heatmap.npy", out_dir / f"{name}_heatmap.csv"]
    _save_figure(fig, paths[0])
    plt.close(fig)
    with atomic_file(paths[1]) as tmp, tmp.open("wb") as f:
        np.save(f, grid.astype(np.float32))
    with atomic_file(paths[2]) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "col", "score"])
        for (row, col), value in np.ndenumerate(grid.reshape(-1, grid.shape[-1])):
            writer.writerow([row, col, f"{value:.6g}"])
    return paths


def save_geojson(out_dir: str | Path, name: str, slide: LazyImage, class_scores: torch.Tensor, target: int,
                 probabilities: Sequence[float], patch_size: int, class_names: Sequence[str] | None = None,
                 method: str = "occlusion") -> Path:
    """Write ``NAME.geojson``: one QuPath tile per tissue cell of a slide, with its evidence as measurements.

    Each feature is the cell's square in level-0 pixel coordinates (the cell's corners at the level the
    model read, clipped to the image, times that level's downsample), so QuPath places it on the slide
    whatever level was read. Its ``measurements`` are ``evidence`` (for the predicted class, what the
    heatmap shows) and ``evidence: CLASS`` for every class; Measure > Show measurement maps colours the
    tiles by one of them. The collection's ``patchgd`` member records the slide's prediction.

    Args:
        out_dir: Folder to write into (created if needed).
        name: File stem.
        slide: The slide as the model read it (its source's level, and its tissue mask).
        class_scores: ``(K, m, n)`` evidence of every class over the slide's own grid.
        target: The class ``evidence`` is about.
        probabilities: The slide's class probabilities.
        patch_size: Cell side in pixels at the level read.
        class_names: Name of each class (default: its index).
        method: How the evidence was computed, for the record.

    Returns:
        The written path.
    """
    source, p = slide.source, patch_size
    scores = class_scores.detach().float().cpu().numpy()
    names = list(class_names) if class_names is not None else [str(k) for k in range(scores.shape[0])]
    rows, cols = scores.shape[1:]
    tissue = np.ones((rows, cols), bool) if slide.tissue is None else slide.tissue.cpu().numpy().astype(bool)
    ds = source.downsample
    features = []
    for r, c in zip(*np.nonzero(tissue)):
        x0, x1 = c * p * ds, min((c + 1) * p, source.width) * ds
        y0, y1 = r * p * ds, min((r + 1) * p, source.height) * ds
        measurements = {"evidence": round(float(scores[target, r, c]), 6)}
        measurements.update({f"evidence: {n}": round(float(scores[k, r, c]), 6) for k, n in enumerate(names)})
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon",
                                      "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                         "properties": {"objectType": "tile", "name": f"cell {r},{c}", "measurements": measurements}})
    collection = {"type": "FeatureCollection", "features": features,
                  "patchgd": {"slide": str(source.path), "level": source.level, "downsample": ds, "patch_size": p,
                              "method": method, "class": names[target],
                              "probabilities": {n: round(float(q), 6) for n, q in zip(names, probabilities)}}}
    path = Path(out_dir) / f"{name}.geojson"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(collection))
    return path


def save_z_image(out_dir: str | Path, name: str, z: torch.Tensor, min_side: int = 256) -> Path:
    """Write ``NAME_z.png``: :func:`z_to_rgb` of one image's ``Z``, each cell a square of pixels.

    Args:
        out_dir: Folder to write into (created if needed).
        name: File stem.
        z: ``(s, *grid)`` latent grid of one image.
        min_side: Cells are enlarged (nearest) until the picture's longer side reaches this.

    Returns:
        The written path.
    """
    from PIL import Image

    rgb = z_to_rgb(z.detach().cpu())
    if rgb.ndim == 2:  # a sequence's grid is one row
        rgb = rgb[None]
    cell = max(1, -(-min_side // max(rgb.shape[:2])))
    big = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    path = Path(out_dir) / f"{name}_z.png"
    with atomic_file(path) as tmp:
        Image.fromarray((big * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path


def write_evidence(model: PatchGDClassifier, images: torch.Tensor | Sequence, items: Sequence, names: list[str],
                   heatmap_dir: str | Path | None = None, z_dir: str | Path | None = None,
                   method: str = "occlusion", class_names: Sequence[str] | None = None) -> tuple[Evidence, list[Path]]:
    """Explain a batch and write, per image, its heatmap files (and for a slide its QuPath GeoJSON,
    :func:`save_geojson`) and/or its ``Z`` picture.

    Args:
        model: The classifier.
        images: The batch as the model takes it (a tensor, or one item per image).
        items: Per image, the data set's item: a ``(C, H, W)`` pixel tensor, a
            :class:`~patchgd.data.lazy.LazyImage` (drawn as its thumbnail) or a ``(C, L)`` sequence.
        names: Per image, the file stem.
        heatmap_dir: Where :func:`save_heatmap` writes (None: no heatmaps).
        z_dir: Where :func:`save_z_image` writes (None: no ``Z`` pictures).
        method: ``"occlusion"`` or ``"grad"``.
        class_names: Name of each class, for the pictures' titles and the GeoJSON measurements.

    Returns:
        The :class:`Evidence` of the batch, and the pictures written (heatmap, then ``Z``, per image).
    """
    from .data.datasets import image_pixels

    evidence = explain(model, images, method)
    probabilities = torch.softmax(evidence.logits, dim=1)
    pictures = []
    for b, (item, name) in enumerate(zip(items, names)):
        label = int(evidence.target[b])
        if heatmap_dir is not None:
            display = image_pixels(item)  # [0, 1] pixels (a slide's thumbnail), or the sequence as it is
            width = item.source.width if isinstance(item, LazyImage) else None
            cell = f"{model.patch_size}-step chunk" if display.dim() == 2 else f"{model.patch_size} px cell"
            said = class_names[label] if class_names is not None else f"class {label}"  # as predict names it
            title = (f"{name}: {said} (p={probabilities[b, label]:.3f})\n{method} evidence per {cell} "
                     "(red supports the class)")
            grid = evidence.scores[b]
            if isinstance(images, list) and display.dim() == 3:  # this image's own cells of a padded batch
                rows, cols = (-(-side // model.patch_size) for side in
                              ((item.source.height, item.source.width) if width else display.shape[1:]))
                grid = grid[:rows, :cols]
            pictures.append(save_heatmap(heatmap_dir, name, display, grid, model.patch_size, title,
                                         image_width=width)[0])
            if isinstance(item, LazyImage):
                rows, cols = grid.shape
                save_geojson(heatmap_dir, name, item, evidence.class_scores[b][:, :rows, :cols], label,
                             probabilities[b].tolist(), model.patch_size, class_names, method)
        if z_dir is not None:
            pictures.append(save_z_image(z_dir, name, evidence.z[b]))
    return evidence, pictures
