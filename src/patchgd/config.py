"""Run configuration: nested dataclasses, YAML files and ``--set dotted.key=value`` overrides.

The dataclasses below are the one home of the schema. Their type annotations drive the type checks and
their field metadata holds the range checks, so no list of keys is restated anywhere else.

Example:
    >>> cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "model.pretrained=null"])
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


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says where, what and why."""


# Checks a field may carry in its metadata: name -> (test, how the expectation reads in an error).
_CHECKS = {
    "gt": (operator.gt, "> {}"),
    "ge": (operator.ge, ">= {}"),
    "lt": (operator.lt, "< {}"),
    "le": (operator.le, "<= {}"),
    "pattern": (lambda value, regex: re.fullmatch(regex, value), "a string matching {}"),
}


def _field(default: Any, **checks: Any) -> Any:
    """A dataclass field whose loaded value must pass ``checks`` (keys of ``_CHECKS``; None skips them)."""
    return field(default=default, metadata=checks)


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: a timm backbone ``backbone`` (or ``conv1d`` for sequences) encoding ``patch_size``
    patches to ``latent_dim``, and a ``head``: ``conv`` (the paper's), ``conv1d`` (sequences),
    ``transformer`` or ``attention`` (gated attention-MIL pooling over the cells), ``head_width`` wide with
    ``head_dropout`` (the transformer's ``head_depth`` layers of ``head_heads`` attention heads).

    Pretrained encoders: ``backbone`` is a timm name (``resnet50``, ``resnet50.a1_in1k`` for one tag) or
    ``hf-hub:ORG/NAME`` (a timm model on the Hugging Face Hub, optionally ``@REVISION``); ``pretrained``
    is ``true`` (the name's default tag, or the hub repository), a local weights file or snapshot folder
    (``config.json`` + ``model.safetensors``), or ``false``; null means true for a hub name and false
    otherwise. Downloads go to the Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses only the
    cache). ``backbone_args`` are extra ``timm.create_model`` arguments (layer classes as
    ``timm.layers.NAME`` / ``torch.nn.NAME``). ``pretrained_origin`` is filled in when a run starts (the
    architecture, weights file, sha256, repository and revision, mean/std): never set it by hand. The
    weights' mean and std become the model's normalisation unless ``data.mean``/``data.std`` are set.
    ``freeze``: null (train everything), ``all`` (the whole encoder; its projection to ``latent_dim`` and
    the head train) or N (the stem and the first N stages or blocks, by timm's ``group_matcher``).
    ``grad_checkpointing`` recomputes the encoder's activations in backward (timm's
    ``set_grad_checkpointing``): less memory, the same update.
    ``init_backbone`` (App. C of the paper) starts the backbone from a checkpoint (``best.pt``/``last.pt``
    of a GD, GD-extended or PatchGD run), a plain state-dict file, or a hub name (``hf-hub:ORG/NAME``)."""

    backbone: str = "resnet18"
    patch_size: int = _field(128, ge=1)
    latent_dim: int = _field(256, ge=1)
    pretrained: bool | str | None = None
    in_chans: int = _field(3, ge=1)
    head_width: int = _field(256, ge=1)
    head_dropout: float = _field(0.2, ge=0, lt=1)
    channels_last: bool = False
    init_backbone: str | None = None
    head: Literal["conv", "conv1d", "transformer", "attention"] = "conv"
    head_depth: int = _field(2, ge=1)
    head_heads: int = _field(4, ge=1)
    backbone_args: dict[str, Any] | None = None
    freeze: int | Literal["all"] | None = None
    grad_checkpointing: bool = False
    pretrained_origin: dict[str, Any] | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels live (paths relative to ``root``) and how their pixels are read.

    Layouts: a train CSV (``train_csv``, columns ``id_column`` and ``label_column``; labels are integers or
    class names) with its image folder ``train_dir``, or, when ``root`` holds no ``train_csv``, one
    subfolder per class (in ``train_dir`` if it exists, else in ``root``). Validation: fold ``fold`` of
    the CSV's kfold column, else ``val_csv`` (or a ``val_dir`` of class folders) when it exists, else a
    stratified, seeded ``val_fraction`` of the training images (recorded in the run's ``split.csv``).
    ``num_classes`` and ``classes`` are inferred from the labels when null (class names sort
    alphabetically); a value given that disagrees with the labels is an error. ``label_column: null``
    auto-detects it; ``image_size`` resizes to a square (the low-resolution GD baseline).

    Pixels: integer images scale by their dtype's range (``bit_depth`` bits instead, e.g. 12 for 12-bit
    data in uint16); ``intensity: unit`` requires float images to lie in [0, 1], ``range`` maps
    ``intensity_range`` [low, high] to [0, 1] (values outside are clipped: a window), ``percentile``
    stretches each image's ``percentiles`` [low, high] to [0, 1]. ``mean``/``std``
    configure the model's normalisation (saved in its checkpoints); ``pad_value`` is a pixel value in the
    images' own units. Whole-slide images: ``level`` or ``mpp`` chooses the resolution, ``tissue: otsu``
    skips cells whose tissue fraction is below ``tissue_fraction``. A file's resolution outside
    0.02-50 um/px (a placeholder such as libvips' 1 px/mm, or 72 dpi) or without a unit counts as unknown;
    ``slide_mpp`` gives every slide's level-0 microns per pixel instead, and a CSV column ``mpp`` one
    slide's (an empty cell: ``slide_mpp`` or the file's).
    ``on_error: skip`` lets a run go on past an image that cannot be opened or a tile that cannot be
    decoded: the image leaves the epoch (or the data set, when it cannot even be opened), and the file,
    level, cell and the decoder's message go to the run log and ``skipped.csv``; more than
    ``max_skipped`` (a fraction) of an epoch's images skipped stops the run. ``stop`` (the default) stops
    at the first such image.
    ``verify``: when the data set is built, ``header`` reads every image's header (size, channels, pixel
    type), ``full`` decodes every image whole (a pass over the data, which also finds corrupt pixel data,
    non-finite pixels and values the intensity options refuse before the first epoch); a slide is opened
    at its level, never decoded whole.
    ``kind: sequences`` reads ``(C, L)`` sequences from ``root/train.npz`` and ``root/val.npz`` instead
    (``patchgd prepare aeon`` writes them).
    ``group_column`` (a CSV column such as a patient or case id) keeps every group on one side of the
    validation split: ``val_fraction`` splits by group (stratified), and a ``fold`` or validation CSV that
    puts a group on both sides is an error naming it; ``split.csv`` records each image's group.
    """

    root: str | None = None
    train_csv: str = "train.csv"
    val_csv: str | None = "val.csv"
    train_dir: str = "train"
    val_dir: str = "val"
    id_column: str = "image_id"
    label_column: str | None = None
    fold: int | None = _field(None, ge=0)
    val_fraction: float = _field(0.2, gt=0, lt=1)
    num_classes: int | None = _field(None, ge=2)
    classes: list[str] | None = None
    image_size: int | None = _field(None, ge=1)
    mean: list[float] | None = None
    std: list[float] | None = None
    pad_value: float = 0.0
    num_workers: int = _field(0, ge=0)
    level: int | None = _field(None, ge=0)
    mpp: float | None = _field(None, gt=0)
    slide_mpp: float | None = _field(None, gt=0)
    on_error: Literal["stop", "skip"] = "stop"
    max_skipped: float = _field(0.05, ge=0, le=1)
    tissue: Literal["otsu", "none"] = "otsu"
    tissue_fraction: float = _field(0.1, ge=0, le=1)
    bit_depth: int | None = _field(None, ge=1, le=32)
    intensity: Literal["unit", "range", "percentile"] = "unit"
    intensity_range: list[float] | None = None
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    verify: Literal["header", "full"] = "header"
    kind: Literal["images", "sequences"] = "images"
    group_column: str | None = None


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, drawn per image and step, of images in memory and slides read in pieces
    alike (:mod:`patchgd.data.augment`), so the patch grid and Z stay aligned with the image: ``flip``
    (left-right and up-down, each with probability 1/2), ``rotate90`` (a random multiple of 90 degrees;
    images whose grid is not square only by 180), and colour jitter for stained (H&E) or natural images:
    ``brightness``, ``contrast`` (about mid-grey), ``saturation``, ``hue`` (torchvision's) and ``hed``, the
    strength of a stain jitter in haematoxylin-eosin-DAB space (0.05 is "HED-light" of Tellez et al.;
    0 = off)."""

    flip: bool = False
    rotate90: bool = False
    brightness: float = _field(0.0, ge=0)
    contrast: float = _field(0.0, ge=0)
    saturation: float = _field(0.0, ge=0)
    hue: float = _field(0.0, ge=0, le=0.5)
    hed: float = _field(0.0, ge=0, le=1)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop. ``schedule: paper`` warms up linearly from 0 over ``warmup_epochs``, then
    decays linearly to half the peak ``lr`` at the last step. ``batch_size`` is per process: under
    ``torchrun`` the global batch is ``batch_size`` times the processes. ``sync_batchnorm`` makes BatchNorm
    use the statistics of every process's batch (CUDA only); without it they are per process. Every
    ``heatmap_every`` epochs (0: never) a PatchGD run writes occlusion heatmaps and ``Z`` pictures of
    ``heatmap_images`` validation images. ``log_every`` batches between progress lines when output is not
    a terminal; ``threads`` sets torch's CPU threads (null: torch's default); ``tensorboard`` writes event
    files into the run directory; ``patience`` stops after that many epochs without a better validation
    accuracy; ``balanced_sampler`` draws training images with probability inversely proportional to their
    class's frequency. ``micro_batch_size`` (GD and GD-extended) splits each batch into micro-batches whose
    gradients accumulate into one update; with ``memory.budget`` the planner keeps ``batch_size`` and picks
    the largest micro-batch that fits. ``backbone_lr`` is the peak rate of the pretrained encoder's
    parameters (default ``lr``; the projection, the head and a GD classifier keep ``lr``), and
    ``layer_decay`` scales it down layer by layer towards the stem (BEiT/timm style: the encoder's last
    group gets ``backbone_lr``, each group below it ``layer_decay`` times the one above)."""

    epochs: int = _field(10, ge=1)
    batch_size: int = _field(8, ge=1)
    lr: float = _field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = _field(0.0, ge=0)
    momentum: float = _field(0.9, ge=0)
    schedule: Literal["paper", "constant"] = "paper"
    warmup_epochs: float = _field(2.0, ge=0)
    amp: Literal["bf16", "fp16"] | None = None
    seed: int = _field(0, ge=0)
    device: str = _field("auto", pattern=r"auto|cpu|cuda(:\d+)?")
    eval_batch_size: int | None = _field(None, ge=1)
    log_every: int = _field(10, ge=1)
    sync_batchnorm: bool = False
    heatmap_every: int = _field(0, ge=0)
    heatmap_images: int = _field(4, ge=1)
    threads: int | None = _field(None, ge=1)
    tensorboard: bool = False
    patience: int | None = _field(None, ge=1)
    balanced_sampler: bool = False
    micro_batch_size: int | None = _field(None, ge=1)
    backbone_lr: float | None = _field(None, gt=0)
    layer_decay: float | None = _field(None, gt=0, le=1)


@dataclass(frozen=True)
class PatchGDConfig:
    """Algorithm 1: the fraction ``sampling`` of patches per inner iteration (or an absolute
    ``patches_per_step`` k per image, which keeps memory fixed as images grow), ``max_sampled`` of them
    per batch; ``inner_iterations`` (ζ) and ``grad_accum_steps`` (ε) are derived from those when null.
    ``parallel_fill`` (under ``torchrun``) has all processes work on the same batch and split the fill of
    its cells among them: for images whose fill dominates a step."""

    sampling: float = _field(0.25, gt=0, le=1)
    patches_per_step: int | None = _field(None, ge=1)
    max_sampled: float = _field(1.0, gt=0)
    inner_iterations: int | None = _field(None, ge=1)
    grad_accum_steps: int | None = _field(None, ge=1)
    fill_mode: Literal["train", "eval"] = "train"
    fill_batch_size: int | None = _field(None, ge=1)
    parallel_fill: bool = False


@dataclass(frozen=True)
class MemoryConfig:
    """A memory budget such as ``"4GB"``, or null for none. It bounds the training step's peak: on CUDA
    the device peak of the caching allocator (the allocator is capped at it), on the CPU the step's
    tensor peak (the process's RSS, reported beside it, also holds the interpreter and libraries)."""

    budget: str | None = None


@dataclass(frozen=True)
class Config:
    """A whole run: the method, where it writes, and one section per concern."""

    method: Literal["patchgd", "gd", "gd-extended"] = "patchgd"
    output_dir: str = "runs/patchgd"
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
        checks = fields[name].metadata
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
        ConfigError: On an unknown key, a value of the wrong type or one out of range.
    """
    return _build(Config, d, "", source)


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
        path: YAML file; None or an empty file means all defaults.
        overrides: ``dotted.key=value`` strings, the value parsed as YAML (``null``, ``[0.5]``, ``3e-4``).

    Returns:
        The validated Config.

    Raises:
        ConfigError: Naming the file or the override, the dotted key, the bad value and what was expected.
    """
    raw, where = {}, None
    if path is not None:
        where = str(path)
        raw = read_yaml(Path(path))
        raw = {} if raw is None else raw
    config = config_from_dict(raw, source=where)  # errors in the file name the file, before any override
    for item in overrides:
        _apply_override(raw, item)
        config = config_from_dict(raw, source=f"--set {item}")
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
