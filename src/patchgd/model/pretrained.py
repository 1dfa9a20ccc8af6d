"""Where a timm encoder's architecture and weights come from: timm's default tag, a Hugging Face Hub
repository, a local weights file or a local snapshot folder.

:func:`resolve_encoder` does every look-up (network or the Hugging Face cache) once, before a model is
built, and returns an *origin record*: a plain, YAML-safe dict with the architecture, its arguments, the
pretrained config (mean, std, input size), the local weights file and its sha256, and the repository and
revision it came from. The model is then built from the record alone (:func:`create_encoder`), so a run's
``config.yaml`` and checkpoints say exactly which weights it started from, and rebuilding a trained model
(``predict``, ``evaluate``, ``--resume``) never needs the hub: :func:`architecture_only` drops the weights.

Weights are read by timm's loader, which takes safetensors files as they are and every other file with
``torch.load(weights_only=True)``; no code from a repository ever runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from safetensors import SafetensorError

__all__ = ["PretrainedError", "resolve_encoder", "architecture_only", "create_encoder", "encoder_normalization",
           "describe_origin"]

HUB_PREFIX = "hf-hub:"
# Weight files of a snapshot, in the order timm's own loader prefers them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# The only modules backbone_args may name layers from ("timm.layers.SwiGLUPacked", "torch.nn.SiLU"): a name
# is looked up as an attribute there, never imported or evaluated.
_LAYER_MODULES = {"timm.layers": "timm.layers", "torch.nn": "torch.nn"}


class PretrainedError(ValueError):
    """Weights that cannot be had: offline with nothing cached, a gated repository, a wrong name or path."""


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _ways_out(model: str, repo: str | None) -> str:
    cache = _hub_cache()
    folder = f"{cache}/models--{repo.replace('/', '--')}" if repo else cache
    return (f"looked in the Hugging Face cache {folder}. Ways out: copy the repository's snapshot there (e.g. "
            f"`hf download {repo or 'ORG/NAME'}` on a machine with network, then copy its HF_HOME), or point "
            f"model.pretrained at a local folder holding config.json and model.safetensors (or at a weights "
            f"file); for a gated repository accept its terms on the hub and run `hf auth login` "
            f"(`huggingface-cli login` in older huggingface_hub; or set HF_TOKEN); HF_HUB_OFFLINE=1 uses only "
            f"the cache (model {model!r})")


def _hub_download(model: str, repo: str, filenames: tuple[str, ...], revision: str | None) -> Path:
    """The first of ``filenames`` that ``repo`` has, from the cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    missing = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except GatedRepoError:
            raise PretrainedError(f"{model}: {repo} is a gated repository and this machine has no token with "
                                  f"access to it; {_ways_out(model, repo)}") from None
        except RepositoryNotFoundError:
            raise PretrainedError(f"{model}: no repository {repo!r} on the Hugging Face Hub (a wrong name, or "
                                  f"private without a token); {_ways_out(model, repo)}") from None
        except RevisionNotFoundError:
            raise PretrainedError(f"{model}: {repo} has no revision {revision!r}; {_ways_out(model, repo)}") from None
        except LocalEntryNotFoundError:  # offline (or unreachable) and not in the cache; before EntryNotFound
            missing.append(filename)
            offline = True
        except EntryNotFoundError:
            missing.append(filename)
            offline = False
        except (HfHubHTTPError, OSError) as err:
            raise PretrainedError(f"{model}: cannot fetch {filename} of {repo} ({' '.join(str(err).split())}); "
                                  f"{_ways_out(model, repo)}") from None
    why = "is not in the cache and the hub cannot be reached (offline)" if offline else "does not exist in the repository"
    raise PretrainedError(f"{model}: {' / '.join(missing)} of {repo} {why}; {_ways_out(model, repo)}")


def _split_revision(repo: str) -> tuple[str, str | None]:
    repo, _, revision = repo.partition("@")
    return repo, revision or None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _snapshot_revision(path: Path) -> str | None:
    """The commit of a file in the Hugging Face cache's ``models--ORG--NAME/snapshots/REV/`` layout."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _read_config(path: Path, model: str) -> tuple[dict, str, dict]:
    """``(pretrained_cfg, architecture, model_args)`` of a timm ``config.json`` (as ``save_for_hf`` writes)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if "pretrained_cfg" not in raw:  # timm's older single-dict layout
            raw = {"architecture": raw.pop("architecture"), "pretrained_cfg": raw}
        pretrained_cfg, architecture = dict(raw["pretrained_cfg"]), raw["architecture"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PretrainedError(f"{model}: {path} is not a timm config.json ({type(err).__name__}: {err}); expected "
                              "the file timm's save_for_hf or push_to_hf_hub writes, with 'architecture' and "
                              "'pretrained_cfg'") from None
    if not timm.is_model(architecture):
        raise PretrainedError(f"{model}: {path} names architecture {architecture!r}, which this timm "
                              f"({timm.__version__}) does not know; upgrade timm (pip install -U timm)")
    return pretrained_cfg, architecture, dict(raw.get("model_args") or {})


def _hub_config(backbone: str) -> tuple[dict, str, dict]:
    """The parsed ``config.json`` of an ``hf-hub:ORG/NAME[@REV]`` backbone, from the cache or the hub."""
    repo, revision = _split_revision(backbone[len(HUB_PREFIX):])
    return _read_config(_hub_download(backbone, repo, ("config.json",), revision), backbone)


def _registry_cfg(name: str) -> tuple[dict, str]:
    """timm's own pretrained config of ``name`` (``arch`` or ``arch.tag``; the default tag for a bare name)."""
    architecture, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        raise PretrainedError(f"unknown backbone {name!r}: expected a timm model name (see timm.list_models()) "
                              "or hf-hub:ORG/NAME")
    cfg = timm.models.get_pretrained_cfg(name if tag else architecture)
    return (cfg.to_dict() if cfg is not None else {}), architecture


def _weights_in(folder: Path, model: str) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PretrainedError(f"{model}: the folder {folder} holds none of {', '.join(WEIGHT_FILES)}; expected a hub "
                          "snapshot (config.json and model.safetensors, as `hf download` or timm's save_for_hf "
                          "write it)")


def _record(source: str, architecture: str, model_args: dict, pretrained_cfg: dict, file: Path | None) -> dict:
    """The origin record: the JSON-safe parts of the pretrained config, the weights file and its digest."""
    keep = ("mean", "std", "input_size", "interpolation", "first_conv", "classifier", "num_classes", "license",
            "hf_hub_id", "tag")
    record = {"source": source, "architecture": architecture, "model_args": _json_safe(model_args),
              "pretrained_cfg": _json_safe({k: pretrained_cfg[k] for k in keep if pretrained_cfg.get(k) is not None})}
    if file is not None:
        file = Path(file).resolve() if _snapshot_revision(Path(file)) is None else Path(file)
        record.update(file=str(file), sha256=_sha256(file), revision=_snapshot_revision(file))
    return record


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolve_encoder(backbone: str, pretrained: bool | str | None) -> dict | None:
    """Find the architecture and weights that ``backbone`` and ``pretrained`` ask for; no model is built.

    Args:
        backbone: A timm model name (``"resnet50"``, or ``"resnet50.a1_in1k"`` for one pretrained tag), or
            ``"hf-hub:ORG/NAME"`` (optionally ``@REVISION``) for a timm model on the Hugging Face Hub.
        pretrained: ``True`` loads the weights of the name's (default) tag or of the hub repository; a path
            names a local weights file or a snapshot folder (``config.json`` + ``model.safetensors``);
            ``False`` keeps the random initialisation; ``None`` means ``True`` for a hub name (its weights
            are what a hub name is for) and ``False`` otherwise.

    Returns:
        The origin record (see the module docstring), or None for a random-initialised registry model,
        which needs nothing recorded.

    Raises:
        PretrainedError: Offline with nothing cached, a gated repository without a token, a wrong name
            or path; the message names the model, the cache folder and the ways out.

    Example:
        >>> resolve_encoder("test_resnet", None) is None
        True
    """
    hub = backbone.startswith(HUB_PREFIX)
    if pretrained is None:
        pretrained = hub
    if pretrained is False and not hub:
        _registry_cfg(backbone)  # the name is checked all the same
        return None
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if path.is_dir():
            config = path / "config.json"
            if config.is_file():
                pretrained_cfg, architecture, model_args = _read_config(config, backbone)
                named = None if hub else timm.models.split_model_name_tag(backbone)[0]
                if named is not None and named != architecture:
                    raise PretrainedError(f"model.pretrained={str(path)!r} holds a {architecture} (its config.json), "
                                          f"but model.backbone is {backbone!r}; expected the same architecture "
                                          f"(set model.backbone: {architecture})")
            elif hub:
                raise PretrainedError(f"model.pretrained={str(path)!r}: no config.json in the folder, which the "
                                      f"architecture of {backbone} is read from; expected a hub snapshot")
            else:
                (pretrained_cfg, architecture), model_args = _registry_cfg(backbone), {}
            return _record(f"local-dir:{path.resolve()}", architecture, model_args, pretrained_cfg,
                           _weights_in(path, backbone))
        if not path.is_file():
            raise PretrainedError(f"model.pretrained={pretrained!r}: no such file or folder; expected a weights file "
                                  "(.safetensors, .pth, .bin), a snapshot folder, true or false")
        if hub:
            pretrained_cfg, architecture, model_args = _hub_config(backbone)
        else:
            (pretrained_cfg, architecture), model_args = _registry_cfg(backbone), {}
        return _record(f"file:{path.resolve()}", architecture, model_args, pretrained_cfg, path)
    if hub:
        pretrained_cfg, architecture, model_args = _hub_config(backbone)
        repo, revision = _split_revision(backbone[len(HUB_PREFIX):])
        file = _hub_download(backbone, repo, WEIGHT_FILES[:2], revision) if pretrained else None
        return _record(backbone, architecture, model_args, pretrained_cfg, file)
    pretrained_cfg, architecture = _registry_cfg(backbone)
    repo = pretrained_cfg.get("hf_hub_id")
    if not repo:
        raise PretrainedError(f"{backbone}: timm has no Hugging Face Hub weights for this name (tag "
                              f"{pretrained_cfg.get('tag')!r}); download its weights yourself and set "
                              "model.pretrained to the file, or pick a tag listed by "
                              f"timm.list_pretrained({architecture!r})")
    filenames = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else WEIGHT_FILES[:2]
    return _record(f"{HUB_PREFIX}{repo}", architecture, {}, pretrained_cfg,
                   _hub_download(backbone, repo, filenames, None))


def architecture_only(record: dict | None) -> dict | None:
    """The record without its weights: what rebuilding a trained model from a checkpoint needs."""
    return None if record is None else {k: v for k, v in record.items() if k != "file"}


def _layer_argument(value: Any) -> Any:
    """``"timm.layers.SwiGLUPacked"`` / ``"torch.nn.SiLU"`` -> that class; anything else as it is."""
    if isinstance(value, str):
        module, _, name = value.rpartition(".")
        if module in _LAYER_MODULES:
            import importlib

            found = getattr(importlib.import_module(_LAYER_MODULES[module]), name, None)
            layer = found.func if isinstance(found, functools.partial) else found  # SwiGLUPacked is a partial
            if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
                raise PretrainedError(f"model.backbone_args: {value!r} is not a layer class of {module}")
            return found
    return value


def create_encoder(name: str, record: dict | None, backbone_args: dict | None = None, **kwargs) -> nn.Module:
    """Build the timm model ``record`` describes (``name`` itself when there is none), with its weights when
    the record has a file. timm adapts the weights to the model asked for: another ``in_chans`` (the stem's
    kernels summed or repeated), another ``img_size`` (a ViT's position table resampled), no classifier.

    Args:
        name: The configured backbone name (a registry name; a hub name needs its record).
        record: From :func:`resolve_encoder` (or :func:`architecture_only`), or None.
        backbone_args: Extra ``timm.create_model`` arguments (they override the record's model arguments);
            layer classes are written as ``"timm.layers.NAME"`` or ``"torch.nn.NAME"``.
        **kwargs: ``timm.create_model`` arguments set by patchgd (``in_chans``, ``num_classes``, ...).
    """
    # patchgd's own arguments (channels, no classifier, the patch size) win over the saved and the user's.
    args = {k: _layer_argument(v) for k, v in {**(record or {}).get("model_args", {}), **(backbone_args or {}),
                                               **kwargs}.items()}
    if record is None:
        if name.startswith(HUB_PREFIX):
            raise PretrainedError(f"{name}: a hub backbone is built from its resolved record "
                                  "(patchgd.pretrained.resolve_encoder)")
        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}: expected a timm model name (see timm.list_models()) "
                             "or hf-hub:ORG/NAME")
        return _create(name, **args)
    cfg = dict(record.get("pretrained_cfg", {}))
    if record.get("file"):
        if not Path(record["file"]).is_file():
            raise PretrainedError(f"{name}: the weights file {record['file']} is gone; resolve the weights again "
                                  "(model.pretrained)")
        try:
            # source "" makes timm load the file itself instead of going back to a hub it may name.
            return _create(record["architecture"], pretrained=True, pretrained_cfg=cfg,
                           pretrained_cfg_overlay={"file": record["file"], "source": ""}, **args)
        except (pickle.UnpicklingError, SafetensorError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "weights_only" not in str(err):  # timm's word for a refused pickle
                raise
            raise PretrainedError(f"{name}: {record['file']} is not a plain weights file "
                                  f"({' '.join(str(err).split())[:200]}); expected safetensors, or a state dict "
                                  "that torch.load(weights_only=True) reads (a file that needs more would run "
                                  "code, which patchgd refuses)") from None
    return _create(record["architecture"], pretrained_cfg=cfg, **args)


def _create(name: str, img_size: int | None = None, **kwargs) -> nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as err:  # a model without a fixed input size (most CNNs) rejects img_size
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


def encoder_normalization(record: dict | None, in_chans: int) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std the weights were trained with (timm's pretrained config), for ``in_chans`` channels:
    as they are for as many channels, averaged for one channel (timm sums a 3-channel stem's kernels into
    a 1-channel one); ``(None, None)`` without weights or for other channel counts."""
    cfg = (record or {}).get("pretrained_cfg", {})
    if not (record and record.get("file")) or "mean" not in cfg or "std" not in cfg:
        return None, None
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) == in_chans:
        return mean, std
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return None, None


def describe_origin(record: dict | None) -> str:
    """One line for the run log: where the encoder came from."""
    if record is None:
        return "random initialisation"
    if not record.get("file"):
        return f"{record['architecture']} from {record['source']}, random initialisation"
    revision = f"@{record['revision']}" if record.get("revision") else ""
    return (f"{record['architecture']} weights from {record['source']}{revision} ({record['file']}, "
            f"sha256 {record['sha256'][:12]}...)")
