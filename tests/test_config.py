"""Config: composition order, fail-fast on unknown keys and wrong types, round trip."""

import pytest

from mmser.config import Config, ConfigError, from_dict, load_config, save_config, to_dict


def _yaml(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_paper_values():
    cfg = Config()
    assert cfg.finetune.lr == 1e-4 and cfg.finetune.epochs == 15
    assert cfg.data.batch_size == 64 and cfg.data.train_crop_s == 10.0
    assert cfg.encoder.mask_time_prob == 0.08 and cfg.encoder.mask_time_length == 15
    assert cfg.encoder.mask_feature_prob == 0.05 and cfg.encoder.mask_feature_length == 64
    assert cfg.data.validation == "none"
    assert cfg.ptapt.cluster_sizes == [64, 512, 4096]


def test_later_files_and_overrides_win(tmp_path):
    a = _yaml(tmp_path, "a.yaml", "experiment: a\nfinetune:\n  epochs: 3\n  lr: 0.001\n")
    b = _yaml(tmp_path, "b.yaml", "finetune:\n  epochs: 5\n")
    cfg = load_config(a, b, overrides=["data.batch_size=8", "encoder.conv_dim=[4, 4]"])
    assert cfg.experiment == "a"
    assert cfg.finetune.epochs == 5  # b overrides a
    assert cfg.finetune.lr == 0.001  # a kept where b is silent
    assert cfg.data.batch_size == 8
    assert cfg.encoder.conv_dim == [4, 4]


def test_int_is_accepted_for_float_and_none_for_optional(tmp_path):
    cfg = load_config(overrides=["finetune.lr=1", "data.max_batch_seconds=null"])
    assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)
    assert cfg.data.max_batch_seconds is None
    cfg = load_config(overrides=["data.max_batch_seconds=250"])
    assert cfg.data.max_batch_seconds == 250.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("finetune.epoch=3", "unknown key 'finetune.epoch'"),
        ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
        ("finetune.epochs=three", "finetune.epochs: expected an integer"),
        ("finetune.epochs=2.5", "finetune.epochs: expected an integer"),
        ("finetune.class_weighted_loss=1", "expected true/false"),
        ("data.validation=random", "expected one of ['none', 'speaker', 'fraction']"),
        ("encoder.conv_dim=5", "expected a list"),
        ("finetune=3", "expected a mapping"),
        ("epochs", "not of the form key=value"),
    ],
)
def test_bad_overrides_fail_fast_with_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert fragment in str(e.value)


def test_bad_file_names_the_file(tmp_path):
    p = _yaml(tmp_path, "bad.yaml", "finetune:\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "finetune.lr" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = _yaml(tmp_path, "broken.yaml", "finetune: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(p)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["experiment=x", "finetune.epochs=2", "tracking.tags=[a, b]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    for f in files:
        load_config(f)  # raises on any unknown key or wrong type


def test_yaml_1_1_quirks_are_accepted():
    # PyYAML reads `1e-4` (no dot) as a string; devices may be given as a number.
    cfg = load_config(overrides=["finetune.lr=1e-4", "trainer.devices=2", "tapt.lr=-2.5E-3"])
    assert cfg.finetune.lr == 1e-4 and cfg.tapt.lr == -2.5e-3
    assert cfg.trainer.devices == 2
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["finetune.lr=1e-4x"])
