import dataclasses
import os
from pathlib import Path

import pytest

from patchgd.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    MemoryConfig,
    ModelConfig,
    PatchGDConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_match_the_documented_schema():
    c = Config()
    assert (c.method, c.output_dir) == ("patchgd", "runs/patchgd")
    assert c.model == ModelConfig("resnet18", 128, 256, None, 3, 256, 0.2, False)
    assert c.data == DataConfig(
        root=None, train_csv="train.csv", val_csv="val.csv", train_dir="train", val_dir="val", id_column="image_id",
        label_column=None, fold=None, val_fraction=0.2, num_classes=None, classes=None, image_size=None, mean=None,
        std=None, pad_value=0.0, num_workers=0, bit_depth=None, intensity="unit", intensity_range=None,
        percentiles=[1.0, 99.0],
    )
    assert c.train == TrainConfig(10, 8, 1e-3, "adam", 0.0, 0.9, "paper", 2.0, None, 0, "auto", None, 10,
                                  threads=None, tensorboard=False, patience=None, balanced_sampler=False,
                                  micro_batch_size=None)
    assert c.augment == AugmentConfig(flip=False, rotate90=False, brightness=0.0, contrast=0.0, saturation=0.0,
                                      hue=0.0)
    assert c.patchgd == PatchGDConfig(sampling=0.25, patches_per_step=None, max_sampled=1.0, inner_iterations=None,
                                      grad_accum_steps=None, fill_mode="train", fill_batch_size=None)
    assert c.memory == MemoryConfig(None)


def test_sections_are_independent_between_instances():
    a, b = Config(), Config()
    assert a.train is not b.train
    a = dataclasses.replace(a, train=dataclasses.replace(a.train, lr=0.5))
    assert b.train.lr == 1e-3


def test_configs_are_never_changed_in_place():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output_dir = "elsewhere"


def test_no_path_and_empty_file_give_defaults(tmp_path):
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\nmodel:\n", "c.yaml")) == Config()


def test_yaml_load_sets_nested_values_and_keeps_the_rest_default(tmp_path):
    path = write(
        tmp_path,
        """
method: gd-extended
model:
  backbone: resnet50
  patch_size: 256
data:
  root: /data/pandas
  mean: [0.5, 0.4, 0.3]
  val_csv: null
  fold: 2
train:
  lr: 1         # int where a float is wanted is fine
  amp: bf16
  device: cuda:1
patchgd:
  sampling: 1
memory:
  budget: 4GB
""",
    )
    c = load_config(path)
    assert c.method == "gd-extended"
    assert (c.model.backbone, c.model.patch_size, c.model.latent_dim) == ("resnet50", 256, 256)
    assert (c.data.root, c.data.val_csv, c.data.fold) == ("/data/pandas", None, 2)
    assert c.data.mean == [0.5, 0.4, 0.3] and all(type(x) is float for x in c.data.mean)
    assert c.train.lr == 1.0 and type(c.train.lr) is float
    assert (c.train.amp, c.train.device, c.train.epochs) == ("bf16", "cuda:1", 10)
    assert c.patchgd.sampling == 1.0
    assert c.memory.budget == "4GB"


def test_exponent_without_a_dot_reads_as_a_float(tmp_path):
    # Plain YAML 1.1 would read 1e-3 as the string "1e-3".
    assert load_config(write(tmp_path, "train:\n  lr: 5e-4\n")).train.lr == 0.0005
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 0.0003


def test_overrides_nested_null_list_and_order(tmp_path):
    path = write(tmp_path, "model:\n  pretrained: weights/r18.pth\ntrain:\n  epochs: 3\n")
    c = load_config(
        path,
        [
            "train.epochs=5",
            "model.pretrained=null",
            "data.mean=[0.5]",
            "data.std=[1, 0.25]",
            "patchgd.inner_iterations=4",
            "train.epochs=7",  # later wins
            "output_dir=runs/a=b",  # only the first '=' splits
        ],
    )
    assert c.train.epochs == 7
    assert c.model.pretrained is None
    assert c.data.mean == [0.5] and c.data.std == [1.0, 0.25]
    assert c.patchgd.inner_iterations == 4
    assert c.output_dir == "runs/a=b"


def test_override_creates_a_section_missing_from_the_file(tmp_path):
    c = load_config(write(tmp_path, "method: gd\n"), ["memory.budget=2GB", " model.in_chans = 1"])
    assert (c.method, c.memory.budget, c.model.in_chans) == ("gd", "2GB", 1)


def test_keys_that_go_together_are_checked_once_every_override_is_in(tmp_path):
    """--set method=gd alone conflicts with the demo's attention head; with --set model.head=conv it is one
    change, in either order, and a file that only its overrides make whole loads too."""
    for sets in (["method=gd", "model.head=conv"], ["model.head=conv", "method=gd"]):
        c = load_config("demo", sets)
        assert (c.method, c.model.head) == ("gd", "conv")
    assert load_config(write(tmp_path, "method: gd\nmodel:\n  head: attention\n"), ["model.head=conv"]).method == "gd"
    with pytest.raises(ConfigError, match=r"demo.yaml --set method=gd: .*method=gd and model.head='attention'"):
        load_config("demo", ["method=gd"])


def test_round_trip_through_yaml_and_dict(tmp_path):
    c = Config(method="gd", model=ModelConfig(pretrained="w.pth"),
               data=DataConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], val_csv=None),
               train=TrainConfig(lr=3e-4, amp="fp16", warmup_epochs=0.5),
               patchgd=PatchGDConfig(sampling=0.1, grad_accum_steps=2), memory=MemoryConfig(budget="512MB"))
    path = tmp_path / "out" / "config.yaml"
    save_config(c, path)
    assert load_config(path) == c
    assert config_from_dict(config_to_dict(c)) == c
    assert config_to_dict(c)["train"]["lr"] == 3e-4


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    save_config(Config(method="gd"), path)  # overwrite in place
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_config(path).method == "gd"


def test_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(Config(method="gd"), path)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(Config(method="patchgd"), path)
    assert os.listdir(tmp_path) == ["config.yaml"]
    monkeypatch.undo()
    assert load_config(path).method == "gd"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        # wrong types: key, value with its type, what was expected
        ('train:\n  epochs: "ten"\n', ["train.epochs", "'ten' (str)", "expected int"]),
        ("train:\n  epochs: true\n", ["train.epochs", "True (bool)", "expected int"]),
        ('train:\n  epochs: "10"\n', ["train.epochs", "'10' (str)", "expected int"]),
        ("train:\n  epochs: 2.0\n", ["train.epochs", "2.0 (float)", "expected int"]),
        ("train:\n  lr: yes\n", ["train.lr", "True (bool)", "expected float"]),
        ("model:\n  patch_size: null\n", ["model.patch_size", "None (NoneType)", "expected int"]),
        ("model:\n  channels_last: 1\n", ["model.channels_last", "1 (int)", "expected bool"]),
        ("model:\n  backbone: 18\n", ["model.backbone", "18 (int)", "expected str"]),
        ("data:\n  mean: 0.5\n", ["data.mean", "0.5 (float)", "list of float or null"]),
        ("data:\n  mean: [0.5, x]\n", ["data.mean", "[0.5, 'x']", "list of float"]),
        ("patchgd:\n  inner_iterations: 1.5\n", ["patchgd.inner_iterations", "expected int or null"]),
        # enums
        ("method: sgd\n", ["method='sgd'", "expected one of patchgd, gd, gd-extended, subbag", "patchgd.register_method"]),
        ("train:\n  optimizer: rmsprop\n", ["train.optimizer", "'rmsprop'", "'adam', 'adamw', 'sgd'"]),
        ("train:\n  schedule: cosine\n", ["train.schedule", "'cosine'", "'paper', 'constant'"]),
        ("train:\n  amp: fp32\n", ["train.amp", "'fp32'", "'bf16', 'fp16' or null"]),
        ("patchgd:\n  fill_mode: test\n", ["patchgd.fill_mode", "'test'", "'train', 'eval'"]),
        ("train:\n  device: gpu\n", ["train.device", "'gpu'", "auto|cpu|cuda"]),
        # ranges
        ("model:\n  patch_size: 0\n", ["model.patch_size", "got 0", ">= 1"]),
        ("model:\n  in_chans: 0\n", ["model.in_chans", "got 0", ">= 1"]),
        ("patchgd:\n  sampling: 0\n", ["patchgd.sampling", "got 0", "> 0 and <= 1"]),
        ("patchgd:\n  sampling: 1.5\n", ["patchgd.sampling", "got 1.5", "> 0 and <= 1"]),
        ("patchgd:\n  max_sampled: 0\n", ["patchgd.max_sampled", "got 0", "> 0"]),
        ("patchgd:\n  inner_iterations: 0\n", ["patchgd.inner_iterations", "got 0", ">= 1"]),
        ("patchgd:\n  grad_accum_steps: 0\n", ["patchgd.grad_accum_steps", "got 0", ">= 1"]),
        ("train:\n  epochs: 0\n", ["train.epochs", "got 0", ">= 1"]),
        ("train:\n  batch_size: -2\n", ["train.batch_size", "got -2", ">= 1"]),
        ("train:\n  lr: 0\n", ["train.lr", "got 0", "> 0"]),
        ("train:\n  lr: -1.0e-3\n", ["train.lr", "got -0.001", "> 0"]),
        ("data:\n  num_classes: 1\n", ["data.num_classes", "got 1", ">= 2"]),
        # structure
        ("model: 5\n", ["model", "got 5 (int)", "section"]),
        ("train: [1, 2]\n", ["train", "got [1, 2] (list)", "section"]),
        ("- a\n- b\n", ["top level", "(list)", "section"]),
    ],
)
def test_file_errors_name_the_file_the_key_and_the_expectation(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "yaml_text, key, suggestion",
    [
        ("trian:\n  lr: 0.1\n", "'trian'", "did you mean 'train'?"),
        ("train:\n  learning_rate: 0.1\n", "'train.learning_rate'", None),
        ("train:\n  epoch: 3\n", "'train.epoch'", "did you mean 'train.epochs'?"),
        ("patchgd:\n  samplng: 0.5\n", "'patchgd.samplng'", "did you mean 'patchgd.sampling'?"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(tmp_path, yaml_text, key, suggestion):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and key in message
    if suggestion:
        assert suggestion in message
    else:  # nothing close: list what the section does accept
        assert "did you mean" not in message and "lr, optimizer" in message


def test_boundary_and_optional_values_are_accepted():
    c = load_config(
        None,
        ["patchgd.sampling=1", "data.num_classes=2", "train.amp=null", "data.fold=0", "train.device=cuda"],
    )
    assert (c.patchgd.sampling, c.data.num_classes, c.train.amp, c.data.fold) == (1.0, 2, None, 0)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr", ["--set 'train.lr'", "dotted.key=value"]),
        ("=3", ["--set '=3'", "dotted.key=value"]),
        ("train.epochs=ten", ["--set train.epochs=ten", "train.epochs", "'ten' (str)", "expected int"]),
        ("train.lrr=0.1", ["train.lrr", "did you mean 'train.lr'?"]),
        ("model=5", ["model", "section"]),
        ("train.epochs.x=5", ["'train.epochs' is a value, not a section"]),
        ("data.mean=[0.5", ["--set 'data.mean=[0.5'", "not valid YAML"]),
    ],
)
def test_override_errors_name_the_override(tmp_path, override, expected):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    for part in expected:
        assert part in str(info.value)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  backbone: resnet18\n  patch_size: [128\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}, line ")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_from_dict_fills_defaults_and_names_its_source():
    c = config_from_dict({"train": {"batch_size": 2}})
    assert c.train.batch_size == 2 and c.train.epochs == 10 and c.model == ModelConfig()
    with pytest.raises(ConfigError, match=r"^ckpt\.pt: train\.batch_size: got 0"):
        config_from_dict({"train": {"batch_size": 0}}, source="ckpt.pt")


@pytest.mark.parametrize("raw, expected", [
    ({"data": {"level": 1, "mpp": 0.5}}, "data.level=1 and data.mpp=0.5"),
    ({"data": {"fold": 2, "test_fold": 2}}, "data.fold=2 and data.test_fold=2"),
    ({"data": {"kind": "sequences", "on_error": "skip"}}, "data.kind=sequences and data.on_error=skip"),
    ({"method": "subbag", "model": {"head": "conv"}}, "method=subbag and model.head='conv'"),
    ({"method": "gd", "model": {"head": "attention"}}, "method=gd and model.head='attention'"),
    ({"train": {"micro_batch_size": 2}}, "method=patchgd and train.micro_batch_size=2"),
    ({"train": {"sync_batchnorm": True}, "data": {"on_error": "skip"}}, "sync_batchnorm=true and data.on_error"),
    ({"train": {"sync_batchnorm": True}, "patchgd": {"parallel_fill": True}}, "patchgd.parallel_fill=true: Sync"),
    ({"augment": {"hed": 0.05}, "model": {"in_chans": 1}}, "model.in_chans=1"),
    ({"method": "gd", "patchgd": {"fill": "cached"}}, "patchgd.fill=cached with method=gd"),
    ({"patchgd": {"fill": "cached"}, "augment": {"rotate90": True}}, "patchgd.fill=cached and augment.*"),
    ({"patchgd": {"fill": "cached", "parallel_fill": True}}, "fill=cached and patchgd.parallel_fill=true"),
    ({"patchgd": {"features_from": "feats"}}, "patchgd.features_from='feats' with patchgd.fill=exact"),
])
def test_keys_that_cannot_go_together_are_refused_when_read(raw, expected):
    # Each conflict is refused where the config is read (seconds, before any data), naming the keys and source.
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="run.yaml")
    assert str(info.value).startswith("run.yaml: ") and expected in str(info.value)


def test_fit_validates_a_config_built_in_python(tmp_path):
    from patchgd.engine.trainer import fit

    cfg = dataclasses.replace(Config(), data=dataclasses.replace(DataConfig(), level=1, mpp=0.5),
                              output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="data.level=1 and data.mpp=0.5"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_every_key_is_in_the_reference_table():
    # The table moved from the README into the generated configuration reference (tests/test_docs.py).
    table = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    cfg, keys = Config(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        nested = dataclasses.is_dataclass(value)
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)] if nested else [f.name]
    missing = [key for key in keys if f"`{key}`" not in table]
    assert not missing, f"config keys missing from the configuration reference: {missing}"
