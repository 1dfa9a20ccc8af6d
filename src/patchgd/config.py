"""Run configuration: nested dataclasses, YAML files and ``--set dotted.key=value`` overrides.

The dataclasses below are the one home of the schema. Their type annotations drive the type checks, their
field metadata holds the range checks and each key's meaning, so no list of keys is restated anywhere else:
the configuration reference (``docs/configuration.md``) is generated from them (:func:`reference`;
``python -m patchgd.config`` prints it). The module is long because each of the schema's keys carries
its meaning here, and nowhere else.

Example:
    >>> cfg = load_config("demo", ["train.lr=3e-4", "model.pretrained=null"])  # a packaged recipe
    >>> cfg.train.lr
    0.0003
    >>> save_config(cfg, "runs/demo/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .io import atomic_file
from .registry import HEADS, METHODS, READERS, patch_method

# The names a config may choose, each listed once. Heads, methods and readers are the registries' (one may
# add to them, so their keys are checked by validate() rather than by their type).
TISSUE_METHODS = ("otsu", "none")
ON_ERROR = ("stop", "skip")  # what a data set does with a file it cannot read
# The validation metrics that may pick best.pt (train.monitor), and whether larger is better.
MONITORS = {"accuracy": True, "balanced_accuracy": True, "auroc": True, "qwk": True, "loss": False}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says where, what and why."""


# The recipes shipped inside the package (the repository's configs/ links here), found by name after
# pip install: ``patchgd train --config slides``.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """``{name: file}`` of the shipped recipes: ``slides``, ``sweeps/panda_sampling_ablation``, ..."""
    return {p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix(): p
            for p in sorted(PACKAGED_CONFIGS.rglob("*.yaml"))}


def find_config(name: str | Path) -> Path:
    """The config file ``name`` stands for: the file itself when it exists, else the shipped recipe of that
    name (``slides``, ``slides.yaml``, or the repository's path ``configs/slides.yaml`` outside a checkout).

    Raises:
        ConfigError: Neither a file nor a recipe; the message lists the recipes.
    """
    path = Path(name)
    if path.exists():
        return path
    parts = path.with_suffix("").parts if path.suffix == ".yaml" else path.parts
    key = "/".join(parts[1:] if parts[:1] == ("configs",) else parts)
    recipes = packaged_configs()
    if key in recipes:
        return recipes[key]
    close = difflib.get_close_matches(key, list(recipes), n=1)
    raise ConfigError(f"{name}: no such config file, and no packaged recipe of that name"
                      f"{f' (did you mean {close[0]!r}?)' if close else ''}; expected a YAML file or one of the "
                      "recipes `patchgd configs` lists")


# Checks a field may carry in its metadata: name -> (test, how the expectation reads in an error).
_CHECKS = {
    "gt": (operator.gt, "> {}"),
    "ge": (operator.ge, ">= {}"),
    "lt": (operator.lt, "< {}"),
    "le": (operator.le, "<= {}"),
    "pattern": (lambda value, regex: re.fullmatch(regex, value), "a string matching {}"),
}


def _field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING,
           **checks: Any) -> Any:
    """A dataclass field: its default (or ``factory``), what it means (``help``, the configuration reference's
    text) and the checks its loaded value must pass (keys of ``_CHECKS``; None skips them)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "checks": checks})


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: backbone, patch and latent size, head, pretrained weights and fine-tuning.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    backbone: str = _field("resnet18",
        help='a timm model name (`resnet50`, `resnet50.a1_in1k` for one tag), `hf-hub:ORG/NAME[@REVISION]`, or '
             '`conv1d` (sequences)')
    patch_size: int = _field(128, ge=1, help='patch side `p` in pixels (chunk length for sequences)')
    latent_dim: int = _field(256, ge=1, help='latent size `s` of each cell of `Z`')
    pretrained: bool | str | None = _field(None,
        help="`true`: the backbone name's default pretrained tag (or the `hf-hub:` repository's weights), downloaded "
             'once into the Hugging Face cache; a local weights file or snapshot folder (`config.json` + '
             '`model.safetensors`); `false`: random; null: true for an `hf-hub:` name, else false')
    in_chans: int = _field(3, ge=1, help='image channels (1 for grayscale)')
    head_width: int = _field(256, ge=1,
        help='channels of the conv head, token width of the transformer head or width of the attention head')
    head_dropout: float = _field(0.2, ge=0, lt=1, help='dropout of the head')
    channels_last: bool = _field(False, help='channels-last memory format')
    init_backbone: str | None = _field(None,
        help="start the backbone from a run's checkpoint, a state dict or an `hf-hub:` repository (the paper's App. C "
             'initialisation, e.g. from a low-resolution GD run)')
    head: str = _field("conv",
        help="`conv` (the paper's head), `conv1d` (the same head for sequences), `transformer`, `attention` (gated "
             "attention-MIL pooling over the cells), `mean` (the cells' mean, then an MLP), or a head registered with "
             "`patchgd.register_head`")
    head_args: dict[str, Any] | None = _field(None,
        help="keyword arguments of the head, on top of `head_width`, `head_dropout`, `head_depth` and `head_heads` "
             "(each given to a head that takes `width`, `dropout`, `depth`, `heads`): a registered head's own options")
    head_depth: int = _field(2, ge=1, help='encoder layers of the transformer head')
    head_heads: int = _field(4, ge=1, help='attention heads of the transformer head')
    backbone_args: dict[str, Any] | None = _field(None,
        help="extra `timm.create_model` arguments (a model card's `timm_kwargs`; layer classes as `timm.layers.NAME` /"
             ' `torch.nn.NAME`)')
    freeze: int | Literal["all"] | None = _field(None,
        help='`all`: the whole encoder (its projection to `s` and the head train), or N: its stem and first N stages '
             '(CNN) or blocks (ViT); frozen parameters get no gradients, no optimizer state, and frozen BatchNorm '
             'keeps its statistics')
    grad_checkpointing: bool = _field(False,
        help="recompute the encoder's activations in backward (timm's `set_grad_checkpointing`): less memory, the same"
             ' update')
    pretrained_origin: dict[str, Any] | None = _field(None,
        help='filled in when a run starts: architecture, weights file, sha256, repository and revision, mean/std; '
             'never set by hand')


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels live, how validation is split off, and how pixels are read.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    root: str | None = _field(None,
        help='folder with class folders, or with `train.csv`/`val.csv` and `train/`, `val/`; for `kind: sequences`, '
             'with `train.npz` and `val.npz`')
    train_csv: str = _field("train.csv", help='training CSV, relative to `data.root`')
    val_csv: str | None = _field("val.csv",
        help='validation CSV, used when present (another name must exist); null: validate on `data.fold` or '
             '`data.val_fraction`')
    train_dir: str = _field("train", help="folder of the training CSV's images, relative to `data.root`")
    val_dir: str = _field("val", help="folder of the validation CSV's images, relative to `data.root`")
    id_column: str = _field("image_id", help='CSV column of image file names (with or without extension)')
    label_column: str | None = _field(None,
        help='CSV column of labels, integers or class names; null: `label`, then `isup_grade` (PANDA)')
    fold: int | None = _field(None, ge=0, help="validate on this fold of the training CSV's `kfold` column")
    test_csv: str = _field("test.csv",
        help='test CSV (images in `data.test_dir`), used when present: held out from training and model selection, '
             'scored once by `best.pt` at the end of the run (`test.json`)')
    test_dir: str = _field("test",
        help="folder of the test CSV's images; for class folders, the test folder beside `train/` and `val/`")
    test_fold: int | None = _field(None, ge=0,
        help="hold out this fold of the training CSV's `kfold` column as the test set (with `data.fold` for "
             'validation, the other folds train)')
    val_fraction: float = _field(0.2, gt=0, lt=1,
        help='share of each class held out for validation when there is no validation CSV, folder or fold (seeded by '
             '`train.seed`; listed in `split.csv`)')
    num_classes: int | None = _field(None, ge=2, help='inferred from the labels; a value given must agree with them')
    classes: list[str] | None = _field(None,
        help='class names in index order; null: the sorted names found (class folders, or name labels)')
    image_size: int | None = _field(None, ge=1, help='resize to a square (e.g. the low-resolution GD baseline)')
    mean: list[float] | None = _field(None,
        help="per-channel mean of the [0, 1]-scaled pixels (`patchgd stats`); null: the pretrained weights' own "
             "(timm's `pretrained_cfg`), else none; applied by the model on the device and saved in its checkpoints")
    std: list[float] | None = _field(None, help='per-channel standard deviation, as `data.mean`')
    pad_value: float = _field(0.0,
        help="pixel value, in the images' own units (0-255 for 8-bit), of the padding beyond the bottom/right edge and"
             ' of the blank patch whose code fills background cells (the glass colour, e.g. `242`, for slides)')
    num_workers: int = _field(0, ge=0,
        help="DataLoader workers: for the batches, and for reading a slide's tiles while the backbone fills `Z`")
    level: int | None = _field(None, ge=0, help='pyramid level to read (0 = full resolution)')
    mpp: float | None = _field(None, gt=0,
        help='read the coarsest level of at most this many microns per pixel (a slide of unknown resolution is an '
             'error)')
    slide_mpp: float | None = _field(None, gt=0,
        help="every slide's microns per pixel at level 0, instead of its metadata (a CSV column `mpp` gives one "
             "slide's)")
    reader: str | None = _field(None,
        help="the reader of every image and slide: `openslide` (vendor formats), `tiff` (tiled TIFF through tifffile + "
             "zarr), `image` (PNG, JPEG, strip TIFF, decoded whole) or one registered with `patchgd.register_reader`; "
             "null: the first reader that claims the file's suffix and contents, in that order")
    on_error: Literal[ON_ERROR] = _field("stop",
        help='`stop`: an image that cannot be opened or decoded stops the run; `skip`: it leaves the data set or the '
             'epoch and is listed in `skipped.csv`')
    max_skipped: float = _field(0.05, ge=0, le=1,
        help="with `on_error: skip`, more than this share of an epoch's images skipped stops the run")
    tissue: Literal[TISSUE_METHODS] = _field("otsu",
        help='`otsu`: cells of a slide (any file read in pieces) whose tissue fraction is below `data.tissue_fraction`'
             ' are background, never sampled nor encoded; `none`: every cell')
    tissue_fraction: float = _field(0.1, ge=0, le=1, help='least tissue fraction of an encoded cell')
    bit_depth: int | None = _field(None, ge=1, le=32,
        help="significant bits of integer images (e.g. 12 for 12-bit data in uint16); null: the dtype's range")
    intensity: Literal["unit", "range", "percentile"] = _field("unit",
        help='float images: `unit` (must lie in [0, 1], else refused), `range` (map `intensity_range` to [0, 1]), '
             "`percentile` (stretch each image's `percentiles`)")
    intensity_range: list[float] | None = _field(None,
        help='`[low, high]` of `intensity: range`, e.g. `[0, 4000]`; values outside are clipped')
    percentiles: list[float] = _field(factory=lambda: [1.0, 99.0],
        help='`[low, high]` percentiles of `intensity: percentile`')
    verify: Literal["header", "full"] = _field("header",
        help='checks of every image when the data set is built: `header` reads each header (size, channels, pixel '
             'type), `full` also decodes every PNG/JPEG whole (finds corrupt pixel data and NaN/inf pixels before the '
             'first epoch); TIFFs and slides are opened at the chosen level, never decoded whole')
    kind: Literal["images", "sequences"] = _field("images",
        help="`images`, or `sequences`: `(C, L)` sequences from `data.root`'s `train.npz`/`val.npz` (`patchgd prepare "
             'aeon`)')
    group_column: str | None = _field(None,
        help="a CSV column of groups (patient or case ids): `data.val_fraction` splits by group (scikit-learn's "
             '`StratifiedGroupKFold`), a fold or validation CSV that puts a group on both sides is an error naming it')


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of each training image, applied alike to the image and its patch grid.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    flip: bool = _field(False, help='random flips of each training image (slides too)')
    rotate90: bool = _field(False,
        help='random quarter turns of each training image (slides too; non-square grids turn by half turns)')
    brightness: float = _field(0.0, ge=0, help='colour jitter: brightness (0 = off)')
    contrast: float = _field(0.0, ge=0, help='colour jitter: contrast (0 = off)')
    saturation: float = _field(0.0, ge=0, help='colour jitter: saturation (0 = off; needs `model.in_chans: 3`)')
    hue: float = _field(0.0, ge=0, le=0.5, help='colour jitter: hue (0 = off; needs `model.in_chans: 3`)')
    hed: float = _field(0.0, ge=0, le=1, help='HED stain jitter strength (0 = off; needs `model.in_chans: 3`)')


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, device, logging and what each epoch writes.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    epochs: int = _field(10, ge=1, help='epochs to train')
    batch_size: int = _field(8, ge=1, help='images per step (per process under `torchrun`)')
    lr: float = _field(1e-3, gt=0, help='peak learning rate')
    optimizer: Literal["adam", "adamw", "sgd"] = _field("adam", help='`adam`, `adamw` or `sgd`')
    weight_decay: float = _field(0.0, ge=0, help='weight decay of the optimizer')
    momentum: float = _field(0.9, ge=0, help='momentum of SGD')
    schedule: Literal["paper", "constant"] = _field("paper",
        help='`paper`: linear warm-up from 0, then linear decay to half the peak at the last step, stepped per batch; '
             '`constant`')
    warmup_epochs: float = _field(2.0, ge=0, help='epochs of linear warm-up of the `paper` schedule')
    amp: Literal["bf16", "fp16"] | None = _field(None,
        help='mixed precision: `bf16` (CPU and CUDA) or `fp16` (CUDA, with a gradient scaler)')
    seed: int = _field(0, ge=0, help='seed of the data order, the sampled cells and the weights')
    device: str = _field("auto", pattern=r"auto|cpu|cuda(:\d+)?", help='`auto`, `cpu`, `cuda` or `cuda:N`')
    eval_batch_size: int | None = _field(None, ge=1, help='batch size of evaluation (default `train.batch_size`)')
    log_every: int = _field(10, ge=1,
        help="batches between progress lines when output is not a terminal (and TensorBoard's step loss)")
    sync_batchnorm: bool = _field(False,
        help="under `torchrun`, BatchNorm with the statistics of every process's batch (SyncBatchNorm; CUDA only); "
             'without it they are per process')
    heatmap_every: int = _field(0, ge=0,
        help='every N epochs (0: never) write occlusion heatmaps and `Z` pictures of fixed validation images into '
             '`RUN_DIR/heatmaps/epochNNN/`')
    heatmap_images: int = _field(4, ge=1, help='how many validation images `heatmap_every` explains')
    threads: int | None = _field(None, ge=1, help="CPU threads of torch (null: torch's default)")
    tensorboard: bool = _field(False,
        help="write TensorBoard events to `RUN_DIR/tensorboard` (`pip install 'patchgd[tensorboard]'`)")
    patience: int | None = _field(None, ge=1,
        help='stop after this many epochs without a better validation `train.monitor`')
    monitor: Literal[tuple(MONITORS)] = _field("accuracy",
        help='the validation metric that picks `best.pt` and drives `train.patience`: `accuracy`, '
             '`balanced_accuracy`, `auroc`, `qwk` (larger is better) or `loss` (smaller)')
    eval_every: int = _field(1, ge=1,
        help='evaluate every this many epochs (and after the last): a cohort with a cached fill need not pay an '
             "exact fill of the validation set every epoch; `best.pt` and `patience` count evaluated epochs")
    bootstrap: int = _field(1000, ge=0,
        help='bootstrap resamples of the 95 % intervals of `test.json` and `patchgd evaluate` (by group where '
             '`data.group_column` is set; 0: none)')
    balanced_sampler: bool = _field(False, help="draw training images inversely to their class's frequency")
    micro_batch_size: int | None = _field(None, ge=1,
        help='GD and GD-extended: split each batch into micro-batches of this many images and accumulate their '
             'gradients into one update; with `memory.budget` the planner picks the largest that fits')
    backbone_lr: float | None = _field(None, gt=0,
        help='peak learning rate of the pretrained encoder (default `train.lr`; the projection, the head and a GD '
             'classifier keep `train.lr`)')
    layer_decay: float | None = _field(None, gt=0, le=1,
        help="layer-wise decay of the encoder's rate: its last layer group gets `backbone_lr`, each group below it "
             "`layer_decay` times the one above (timm's `group_matcher`)")


@dataclass(frozen=True)
class PatchGDConfig:
    """PatchGD's own settings: which cells carry gradients, how often it updates, how ``Z`` is filled.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    sampling: float = _field(0.25, gt=0, le=1,
        help='fraction of cells per inner iteration: `k = ceil(sampling * m * n)` (memory grows with the image)')
    patches_per_step: int | None = _field(None, ge=1,
        help='`k` as a number of cells per image instead (memory fixed as images grow; `ζ` grows)')
    max_sampled: float = _field(1.0, gt=0, help='fraction of cells per batch: `ζ = ceil(max_sampled / sampling)`')
    inner_iterations: int | None = _field(None, ge=1, help='`ζ` directly')
    grad_accum_steps: int | None = _field(None, ge=1,
        help='`ε`: inner iterations per update (null: `ζ`, one update per batch)')
    fill_mode: Literal["train", "eval"] = _field("train",
        help="backbone mode while filling `Z` in training: `train` (the paper's code: BatchNorm on batch statistics) "
             'or `eval` (running statistics)')
    fill_batch_size: int | None = _field(None, ge=1,
        help='patches per backbone call in the fill (default: in a training step those of one inner step, `B * k`; '
             'in evaluation and prediction one grid row of every image, at most 64 patches of a slide)')
    parallel_fill: bool = _field(False,
        help='under `torchrun`, all processes train on the same batch and split the fill of its cells among them (for '
             'images whose fill dominates a step)')
    fill: Literal["exact", "cached"] = _field("exact",
        help="`exact`: every step fills `Z` with the current weights (Algorithm 1); `cached`: `Z` persists across "
             "steps in a store, images are filled whole at their first visit, each step re-encodes the sampled cells "
             "(with gradients, written back) and the `refresh` oldest (without): cheaper, with codes of earlier "
             "weights; with `model.freeze: all` the store holds the encoder's features, which never go stale")
    refresh: int = _field(0, ge=0,
        help="`fill: cached`: the oldest cells of each image re-encoded without gradients in each step (at least "
             "the grid's cells: every cell, which is `exact`)")
    refresh_epochs: int | None = _field(None, ge=1,
        help='`fill: cached`: every this many epochs, each image is filled whole again at its first visit')
    store: Literal["memory", "disk"] = _field("memory",
        help="`fill: cached`: where the codes live: `memory` (saved in the checkpoints; one process) or `disk` "
             "(memory-mapped files under `store_dir`, with an undo journal so that a killed run resumes exactly; "
             "any `torchrun` process reads and writes it, so several machines need a shared folder)")
    store_dir: str | None = _field(None, help="`store: disk`: the folder (default `RUN_DIR/zstore`)")
    store_dtype: Literal["float16", "float32"] = _field("float16",
        help="`fill: cached`: the stored codes' type (`float32` doubles the store)")
    features_from: str | None = _field(None,
        help="`fill: cached` with `model.freeze: all`: a folder of per-slide feature files (`patchgd extract`, "
             "TRIDENT, CLAM: `NAME.h5` with `features` and level-0 `coords`) that an image's first fill reads "
             "instead of encoding (its cells the file lacks are encoded); the same encoder, patch size and level")


@dataclass(frozen=True)
class MemoryConfig:
    """A memory budget for the training step, and how it is measured.

    Every key's meaning is its field's ``help``: :func:`reference` lists them all."""

    budget: str | None = _field(None,
        help='e.g. `4GB`: the planner picks the batch size (and `k`) whose measured peak fits: the device peak on '
             'CUDA, the tensor peak on the CPU')


@dataclass(frozen=True)
class Config:
    """A whole run: the method, where it writes, and one section per concern."""

    method: str = _field("patchgd",
        help='`patchgd`, `gd` (the backbone with its own classifier on the whole image), `gd-extended` (its unpooled'
             " feature map and a head like PatchGD's) or `subbag` (each step encodes `k` random cells per image with "
             "gradients and an `attention` or `mean` head classifies those alone; evaluation encodes every cell), or a "
             "method registered with `patchgd.register_method`")
    output_dir: str = _field("runs/patchgd", help='the run directory')
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    patchgd: PatchGDConfig = field(default_factory=PatchGDConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float: YAML 1.1 wants ``1.0e-3`` and would give a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _error(where: str | None, key: str, value: Any, expected: str) -> ConfigError:
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}{key}: got {value!r} ({type(value).__name__}), expected {expected}")


def _describe(hint: Any) -> str:
    """How a type annotation reads in an error message, e.g. ``one of 'bf16', 'fp16' or null``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping of names to values"
    return hint.__name__


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; raises TypeError unless it already is one (int -> float aside)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, inner)
            except TypeError:
                continue
        raise TypeError
    if origin is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(item, args[0]) for item in value]
    elif hint is float:
        # Writing `lr: 1` is harmless; a bool is an int to Python but never a number to a user.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif type(value) is hint:  # exact, so True is no int and "3" no int
        return value
    raise TypeError


def _build(cls: type, raw: Any, prefix: str, where: str | None) -> Any:
    """An instance of dataclass ``cls`` from mapping ``raw``, checked key by key; ``prefix`` names it."""
    if raw is None:  # a section whose keys are all commented out reads as null
        raw = {}
    if not isinstance(raw, Mapping):
        raise _error(where, prefix or "the top level", raw, "a section (a mapping of keys)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            section = f"{prefix}." if prefix else ""
            hint = f"did you mean '{section}{close[0]}'?" if close else f"expected one of {', '.join(fields)}"
            raise ConfigError(f"{where + ': ' if where else ''}unknown key '{key}'; {hint}")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key, where)
            continue
        try:
            value = _coerce(value, hints[name])
        except TypeError:
            raise _error(where, key, value, _describe(hints[name])) from None
        checks = fields[name].metadata["checks"]
        if value is not None and not all(_CHECKS[check][0](value, bound) for check, bound in checks.items()):
            raise _error(where, key, value, " and ".join(_CHECKS[c][1].format(b) for c, b in checks.items()))
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any] | None, source: str | None = None) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping; missing keys take defaults.

    Args:
        d: Nested mapping as read from YAML, e.g. ``{"train": {"lr": 3e-4}}``.
        source: What to name in error messages (a file path), if anything.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type or one out of range, or keys that cannot
            go together (:func:`validate`).
    """
    config = _build(Config, d, "", source)
    validate(config, source)
    return config


def validate(config: Config, source: str | None = None) -> None:
    """Every check that combines keys, run when a config is read: before torch or any data set, a conflict is
    refused in well under a second, naming the keys.

    Raises:
        ConfigError: The first conflict found.
    """
    d, m, t, p, a = config.data, config.model, config.train, config.patchgd, config.augment
    for registry, name in ((METHODS, config.method), (HEADS, m.head), (READERS, d.reader)):
        if name is not None:
            try:
                registry.check(name)
            except ValueError as err:
                raise ConfigError(f"{source}: {err}" if source else str(err)) from None
    patch = patch_method(config.method)
    bag_heads = [name for name in HEADS.names() if HEADS.info(name).get("bag")]
    conflicts = [
        (d.level is not None and d.mpp is not None,
         f"data.level={d.level} and data.mpp={d.mpp}: give one (a pyramid level, or the microns per pixel to read "
         "at), not both"),
        (d.fold is not None and d.fold == d.test_fold,
         f"data.fold={d.fold} and data.test_fold={d.test_fold}: the validation and test folds must differ"),
        (d.kind == "sequences" and d.on_error == "skip",
         "data.kind=sequences and data.on_error=skip: skipping leaves out image files that cannot be read; "
         "sequences come whole from train.npz and val.npz"),
        (METHODS.info(config.method).get("bag") and not HEADS.info(m.head).get("bag"),
         f"method={config.method} and model.head={m.head!r}: a sub-bag is a set of cells; expected a head that takes "
         f"one: {', '.join(bag_heads)}"),
        (config.method in ("gd", "gd-extended") and m.head != "conv",
         f"method={config.method} and model.head={m.head!r}: the GD baselines have their own classifier or conv "
         "head; model.head is PatchGD's"),
        (patch and t.micro_batch_size is not None,
         f"method={config.method} and train.micro_batch_size={t.micro_batch_size}: micro-batches split GD's batches; "
         "PatchGD bounds its memory with patchgd.sampling or patchgd.patches_per_step"),
        (t.sync_batchnorm and d.on_error == "skip",
         "train.sync_batchnorm=true and data.on_error=skip: a step run again without an unreadable image would "
         "repeat SyncBatchNorm's all-reduces on one process only; choose one"),
        (t.sync_batchnorm and p.parallel_fill and config.method == "patchgd",
         "train.sync_batchnorm=true and patchgd.parallel_fill=true: SyncBatchNorm all-reduces per chunk, and the "
         "parallel fill gives the processes unequal chunk counts; choose one"),
        ((a.saturation or a.hue or a.hed) and m.in_chans != 3,
         f"augment.saturation/hue/hed and model.in_chans={m.in_chans}: colour and stain jitter need colour images "
         "(in_chans 3)"),
        (p.fill == "cached" and (config.method != "patchgd" or d.kind != "images"),
         f"patchgd.fill=cached with method={config.method}, data.kind={d.kind}: the cached fill keeps PatchGD's Z "
         "of images"),
        (p.fill == "cached" and any((a.flip, a.rotate90, a.brightness, a.contrast, a.saturation, a.hue, a.hed)),
         "patchgd.fill=cached and augment.*: every step would show another view of an image, whose cached codes "
         "belong to the view they were made from; turn augmentation off, or use patchgd.fill=exact"),
        (p.fill == "cached" and p.parallel_fill,
         "patchgd.fill=cached and patchgd.parallel_fill=true: the cached fill reads Z, it does not split a fill"),
        (p.features_from is not None and (p.fill != "cached" or m.freeze != "all"),
         f"patchgd.features_from={p.features_from!r} with patchgd.fill={p.fill}, model.freeze={m.freeze!r}: stored "
         "features are a frozen encoder's, read by a cached fill: expected fill cached and freeze all"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise ConfigError(f"{source}: {message}" if source else message)


def known_keys(raw: Mapping[str, Any], cls: type = None, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """``raw`` without the keys this release's schema does not know (a config of another release), and the
    dotted names of those dropped."""
    cls = cls or Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kept, dropped = {}, []
    for key, value in raw.items():
        if key not in fields:
            dropped.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            kept[key], more = known_keys(value, hints[key], f"{prefix}{key}.")
            dropped += more
        else:
            kept[key] = value
    return kept, dropped


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists, ready for YAML or a checkpoint."""
    return dataclasses.asdict(config)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple]:
    """Every dotted key whose value differs between two nested config dicts, as ``{key: (old, new)}``.

    Example:
        >>> config_differences({"train": {"lr": 0.1, "seed": 0}}, {"train": {"lr": 0.5, "seed": 0}})
        {'train.lr': (0.1, 0.5)}
    """
    differences = {}
    for name in sorted(set(old) | set(new), key=list({**old, **new}).index):
        key = f"{prefix}{name}"
        a, b = old.get(name), new.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            differences.update(config_differences(a, b, f"{key}."))
        elif a != b:
            differences[key] = (a, b)
    return differences


def read_yaml(path: Path) -> Any:
    """A YAML file as Python values (``1e-3`` a float), or a ConfigError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one ``dotted.key=value`` in nested dict ``raw``, the value parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    *sections, name = key.split(".")
    node = raw
    for depth, section in enumerate(sections, 1):
        if node.get(section) is None:
            node[section] = {}
        if not isinstance(node[section], dict):
            raise ConfigError(f"--set {item!r}: '{'.'.join(sections[:depth])}' is a value, not a section")
        node = node[section]
    node[name] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply ``--set`` overrides in order, and validate.

    Args:
        path: YAML file, or the name of a packaged recipe (:func:`find_config`); None or an empty file means
            all defaults.
        overrides: ``dotted.key=value`` strings, the value parsed as YAML (``null``, ``[0.5]``, ``3e-4``).

    Returns:
        The validated Config.

    Raises:
        ConfigError: Naming the file or the override, the dotted key, the bad value and what was expected.
    """
    raw, where = {}, None
    if path is not None:
        path = find_config(path)
        where = str(path)
        raw = read_yaml(path)
        raw = {} if raw is None else raw
    config = _build(Config, raw, "", where)  # errors in the file name the file, before any override
    for item in overrides:
        _apply_override(raw, item)
        config = _build(Config, raw, "", f"--set {item}")
    # Keys that go together are checked once every override is in: --set method=gd --set model.head=conv is
    # one change, in either order.
    validate(config, " ".join(filter(None, [where, *(f"--set {item}" for item in overrides)])) or None)
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML, atomically: a reader never sees a half-written file.

    Args:
        config: The config to save; ``load_config(path)`` gives it back equal.
        path: Destination file; missing parent folders are created.
    """
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def check_paths(config: Config) -> None:
    """Check that the folders and files a training run reads exist, so that a wrong path is reported before
    torch is loaded (seconds) instead of after. Hub names (``hf-hub:``) are resolved later.

    Raises:
        ConfigError: ``data.root`` is not set.
        FileNotFoundError: ``data.root`` or ``model.init_backbone`` does not exist.
    """
    data = config.data
    if data.root is None:
        holding = "train.npz and val.npz" if data.kind == "sequences" else "the CSVs and images"
        raise ConfigError(f"data.root is not set: point it at the folder holding {holding}")
    if not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root {data.root} does not exist")
    init = config.model.init_backbone
    if init is not None and not init.startswith("hf-hub:") and not Path(init).is_file():
        raise FileNotFoundError(f"model.init_backbone {init} does not exist; expected a patchgd checkpoint "
                                "(best.pt) or a state-dict file, or hf-hub:ORG/NAME")


REFERENCE_INTRO = """# Configuration reference

A run is configured by one YAML file (`patchgd train --config FILE`) with `--set dotted.key=value`
overrides on top; an unknown key, a value of the wrong type or one out of range is an error that names the
file or the override, the key, the value and what was expected. Every run writes its resolved config to
`RUN_DIR/config.yaml`. Configs are frozen: the code never changes one in place.

This page is generated from the config dataclasses (`python -m patchgd.config > docs/configuration.md`);
a test keeps it equal to them.
"""


def reference() -> str:
    """The configuration reference as Markdown: per section, every key with its default, the values it
    takes and what it means, from the dataclasses' fields."""
    def rows(cls: type, prefix: str):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            takes = _describe(hints[f.name]) + "".join(
                f", {_CHECKS[c][1].format(b)}" for c, b in f.metadata["checks"].items())
            shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
            yield (f"`{prefix}{f.name}`", f"`{shown}`", takes.replace("|", "\\|"),
                   f.metadata["help"].replace("|", "\\|"))

    sections = [("Top level", Config, "")] + [
        (f"`{f.name}`", get_type_hints(Config)[f.name], f"{f.name}.") for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(get_type_hints(Config)[f.name])]
    parts = [REFERENCE_INTRO]
    for title, cls, prefix in sections:
        summary = (cls.__doc__ or "").split("\n\n")[0].strip()
        table = ["| key | default | takes | meaning |", "|---|---|---|---|"]
        table += ["| " + " | ".join(row) + " |" for row in rows(cls, prefix)]
        parts.append(f"## {title}\n\n{summary}\n\n" + "\n".join(table) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
