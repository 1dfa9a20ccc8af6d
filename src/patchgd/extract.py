"""Two-stage features: every image of a config's data encoded once by its encoder (``patchgd extract``).

One ``NAME.h5`` per image or slide in TRIDENT's and CLAM's layout (:mod:`patchgd.data.features`): the
encoder's pooled features (before patchgd's projection to ``s``) of each encoded cell (the tissue cells of
a slide), with the level-0 corner of each. The encoder runs in eval mode, as at inference. Files that exist
are complete (written atomically) and skipped, so a killed extraction resumes; a file that cannot be read
is skipped and listed in ``OUT/skipped.csv``; under torchrun, process ``r`` takes images ``r, r + n, ...``.

A run with ``patchgd.fill: cached``, ``model.freeze: all`` and ``patchgd.features_from: OUT`` then trains
the projection and the head on these features, encoding nothing it finds there.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch

from . import distributed
from .config import Config, ConfigError
from .data.datasets import load_image
from .data.errors import DataError
from .data.features import write_features
from .data.lazy import LazyImage
from .engine.build import build_model, resolve_device, resolve_weights
from .engine.data import build_datasets, build_test_set, read_options, resolve_classes
from .engine.state import seed_everything
from .io import atomic_file
from .runlog import Progress

__all__ = ["extract_features"]


def extract_features(cfg: Config, out: str | Path, *, device: str = "auto", log=print) -> dict:
    """Encode the training, validation and test images of ``cfg`` into ``out`` (see the module docstring).

    Returns:
        ``{"written": n, "existing": n, "skipped": [(path, why), ...]}`` of this process.
    """
    if cfg.data.kind == "sequences" or cfg.data.image_size is not None:
        raise ConfigError("patchgd extract encodes images at their own size (the features' coordinates are "
                          "pixels of the slide): data.kind images, data.image_size null")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve_weights(cfg)
    # A file that cannot be opened leaves the data sets, listed: an extraction goes on past broken slides.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_error="skip", max_skipped=1.0))
    train_set, val_set = build_datasets(cfg)
    cfg = resolve_classes(cfg, train_set, val_set)
    test_set = build_test_set(cfg, train_set, val_set)
    sets = [ds for ds in (train_set, val_set, test_set) if ds is not None]
    paths = list(dict.fromkeys(str(p) for ds in sets for p in ds.paths))
    unopened = {s.path: s.message for ds in sets for s in ds.excluded}
    stems: dict[str, str] = {}
    for path in [*paths, *unopened]:
        other = stems.setdefault(Path(path).stem, path)
        if other != path:
            raise DataError(f"two images are named {Path(path).stem!r} ({other} and {path}); feature files are named "
                            "by the image's name, as TRIDENT names them: expected distinct names")
    torch_device = resolve_device(device)
    seed_everything(cfg.train.seed)  # a random encoder is the one a run of this config starts from
    model = build_model(cfg).to(torch_device).eval()
    if model.feature_dim is None:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: patchgd extract stores a timm encoder's features")
    origin = (cfg.model.pretrained_origin or {}).get("source", "random initialisation")
    mine = paths[distributed.rank()::distributed.world_size()]
    written, existing = 0, 0
    skipped = list(unopened.items()) if distributed.is_main() else []
    for path in Progress(mine, "extract", unit="image"):
        name = Path(path).stem
        target = out / f"{name}.h5"
        if target.is_file():
            existing += 1
            continue
        try:
            item = load_image(path, **read_options(cfg))
            grid = model.grid([item])
            with torch.inference_mode():
                z = model.fill_z(grid, features=True).flatten(2)[0]
            _, cells = grid.encoded_cells()
            rows, cols = cells // grid.cols, cells % grid.cols
            source = item.source if isinstance(item, LazyImage) else None
            cell0 = round(cfg.model.patch_size * (source.downsample if source is not None else 1))
            write_features(target, z[:, cells].T.cpu().numpy(), torch.stack([cols, rows], 1).numpy() * cell0,
                           patch_size=cfg.model.patch_size, patch_size_level0=cell0, name=name,
                           mpp=source.resolution()[0] if source is not None else None,
                           level=source.level if source is not None else 0, encoder=origin,
                           architecture=cfg.model.backbone)
            written += 1
        except DataError as err:
            skipped.append((path, str(err)))
            log(f"skipped {path}: {str(err).removeprefix(f'{path}: ')}")
    if skipped:
        with atomic_file(out / f"skipped-r{distributed.rank()}.csv" if distributed.world_size() > 1
                         else out / "skipped.csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "message"])
            writer.writerows(skipped)
    log(f"extract: {written} written, {existing} already there, {len(skipped)} skipped"
        + (f" (listed in {out / 'skipped.csv'})" if skipped else "") + f"; {out}")
    return {"written": written, "existing": existing, "skipped": skipped}
