"""Config: composition order, fail-fast on unknown keys, wrong types and out-of-range values, round trip."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from mmser.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
    validate_config,
)


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
    files = sorted(f for f in root.glob("*.yaml") if not f.name.startswith("sweep_"))  # W&B sweep files
    for f in files:
        load_config(f)  # raises on any unknown key or wrong type


def test_yaml_1_1_quirks_are_accepted():
    # PyYAML reads `1e-4` (no dot) as a string; devices may be given as a number.
    cfg = load_config(overrides=["finetune.lr=1e-4", "trainer.devices=2", "tapt.lr=+2.5E-3"])
    assert cfg.finetune.lr == 1e-4 and cfg.tapt.lr == 2.5e-3
    assert cfg.trainer.devices == 2
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["finetune.lr=1e-4x"])
    with pytest.raises(ConfigError, match=r"tapt.lr: must be > 0, got -0.0025"):  # read as a number
        load_config(overrides=["tapt.lr=-2.5E-3"])


# --------------------------------------------------------------------------------------------
# Ranges: every numeric field declares one (config.ranged); checked once, on the final config
# --------------------------------------------------------------------------------------------

SECTIONS = ["data", "encoder", "finetune", "trainer", "tracking", "tapt", "ptapt", "text", "fusion"]


def _numeric(tp) -> bool:
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(tp))


def test_every_numeric_field_declares_a_range():
    cfg = Config()
    missing = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if _numeric(hints[f.name]) and "range" not in f.metadata:
                missing.append(f"{section}.{f.name}")
    assert not missing, f"numeric fields without a declared range: {missing}"
    assert validate_config(Config()) is not None  # the defaults are in range


@pytest.mark.parametrize(
    "override, message",
    [
        # the reliability issue's cases: a hang (-1 = Lightning's "no limit") and silent nonsense
        ("finetune.epochs=-1", "finetune.epochs: must be >= 1, got -1"),
        ("finetune.epochs=0", "finetune.epochs: must be >= 1, got 0"),
        ("finetune.lr=0", "finetune.lr: must be > 0, got 0.0"),
        ("data.train_crop_s=-0.1", "data.train_crop_s: must be > 0, got -0.1"),
        ("data.train_crop_s=0", "data.train_crop_s: must be > 0, got 0.0"),
        ("finetune.max_steps=0", "finetune.max_steps: must be -1 or >= 1, got 0"),
        ("finetune.max_steps=-2", "finetune.max_steps: must be -1 or >= 1, got -2"),
        ("finetune.lr=.inf", "finetune.lr: must be > 0, got inf"),
        ("finetune.lr=.nan", "finetune.lr: must be > 0, got nan"),
        # one or more per section
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("data.val_fraction=1", "data.val_fraction: must be in (0, 1), got 1.0"),
        ("data.max_batch_seconds=0", "data.max_batch_seconds: must be > 0 or null, got 0.0"),
        ("data.limit_train=0", "data.limit_train: must be >= 1 or null, got 0"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("encoder.mask_time_prob=1.5", "encoder.mask_time_prob: must be in [0, 1], got 1.5"),
        ("encoder.mask_feature_prob=-0.1", "encoder.mask_feature_prob: must be in [0, 1], got -0.1"),
        ("encoder.mask_time_length=0", "encoder.mask_time_length: must be >= 1, got 0"),
        ("encoder.layerdrop=1", "encoder.layerdrop: must be in [0, 1) or null, got 1.0"),
        ("encoder.conv_stride=[5,0,2]", "encoder.conv_stride[1]: must be >= 1, got 0"),
        ("encoder.conv_dim=[]", "encoder.conv_dim: must not be empty"),
        ("trainer.devices=0", "trainer.devices: must be -1 or >= 1, got 0"),
        ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val: must be > 0 or null, got 0.0"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps: must be >= 1, got 0"),
        ("tracking.init_timeout_s=0", "tracking.init_timeout_s: must be > 0, got 0.0"),
        ("tapt.mask_time_prob=0", "tapt.mask_time_prob: must be in (0, 1], got 0.0"),
        ("tapt.total_steps=0", "tapt.total_steps: must be >= 1, got 0"),
        ("tapt.contrastive_temperature=0", "tapt.contrastive_temperature: must be > 0, got 0.0"),
        ("ptapt.cluster_sizes=[64,1]", "ptapt.cluster_sizes[1]: must be >= 2, got 1"),
        ("ptapt.kmeans_fit_fraction=0", "ptapt.kmeans_fit_fraction: must be in (0, 1], got 0.0"),
        ("ptapt.frame_val_fraction=0", "ptapt.frame_val_fraction: must be in (0, 1), got 0.0"),
        ("ptapt.wav2vec1_feature_layers=[[512,10,0]]", "ptapt.wav2vec1_feature_layers[0][2]: must be >= 1, got 0"),
        ("ptapt.frame_batch_size=0", "ptapt.frame_batch_size: must be >= 1, got 0"),
        ("ptapt.seed=-1", "ptapt.seed: must be >= 0, got -1"),
        ("text.lr=0", "text.lr: must be > 0, got 0.0"),
        ("text.max_length=0", "text.max_length: must be >= 1, got 0"),
        ("fusion.dropout=1", "fusion.dropout: must be in [0, 1), got 1.0"),
        ("fusion.num_heads=0", "fusion.num_heads: must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_fail_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value) == f"override '{override}': {message}"


def test_range_boundaries_are_accepted():
    cfg = load_config(overrides=[
        "finetune.max_steps=-1", "finetune.epochs=1", "encoder.mask_time_prob=0", "encoder.mask_feature_prob=1",
        "encoder.mask_time_min_masks=0", "tapt.mask_time_prob=1", "tapt.warmup_steps=0", "tapt.hold_steps=0",
        "ptapt.kmeans_fit_fraction=1", "ptapt.cluster_sizes=[2]", "data.num_workers=0", "trainer.devices=-1",
        "fusion.dropout=0", "tapt.diversity_loss_weight=0", "data.limit_train=null", "encoder.layerdrop=0"])
    assert cfg.finetune.max_steps == -1 and cfg.ptapt.cluster_sizes == [2]


@pytest.mark.parametrize("section, warmup, hold, total", [
    ("tapt", "warmup_steps", "hold_steps", "total_steps"),
    ("ptapt", "warmup_steps", "hold_steps", "total_steps"),
    ("ptapt", "frame_warmup_steps", "frame_hold_steps", "frame_steps"),
])
def test_schedule_warmup_and_hold_fit_in_total(section, warmup, hold, total):
    ok = load_config(overrides=[f"{section}.{warmup}=2", f"{section}.{hold}=3", f"{section}.{total}=5"])
    assert getattr(getattr(ok, section), total) == 5  # warm-up + flat == total: allowed (no decay)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{section}.{warmup}=2", f"{section}.{hold}=3", f"{section}.{total}=4"])
    msg = str(e.value)
    assert f"{section}.{warmup} + {section}.{hold} must be <= {section}.{total}" in msg
    assert f"override '{section}.{total}=4'" in msg  # names where the values came from
    assert f"{section}.{warmup}=2, {section}.{hold}=3, {section}.{total}=4" in msg


def test_other_cross_field_checks():
    for overrides, fragment in [
        (["encoder.name=random", "encoder.conv_dim=[4,4]"],
         "encoder.conv_dim, conv_kernel and conv_stride must have one entry per CNN layer"),
        (["ptapt.wav2vec1_aggregator_layers=[[16,2]]"], "every entry of ptapt.wav2vec1_aggregator_layers must be"),
        (["encoder.name=random", "encoder.hidden_size=30", "encoder.num_attention_heads=4"],
         "encoder.hidden_size must be a multiple of encoder.num_attention_heads"),
        (["fusion.head=cross_attention", "fusion.hidden_size=30", "fusion.num_heads=4"],
         "fusion.hidden_size must be a multiple of fusion.num_heads"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(overrides=overrides)
    # the same values where they are not used (a hub encoder, no cross-attention head) pass
    load_config(overrides=["encoder.hidden_size=30", "encoder.num_attention_heads=4", "fusion.hidden_size=30",
                           "encoder.conv_dim=[4,4]"])


def test_validation_sees_the_final_config_not_each_file(tmp_path):
    # Each file alone breaks the schedule check with the defaults (warm-up 100 + flat 1000);
    # together, or with the override, the final config is valid: no per-file validation.
    short = _yaml(tmp_path, "short.yaml", "tapt:\n  total_steps: 12\n")
    steps = _yaml(tmp_path, "steps.yaml", "tapt:\n  warmup_steps: 2\n  hold_steps: 4\n")
    assert load_config(short, steps).tapt.total_steps == 12
    assert load_config(short, overrides=["tapt.warmup_steps=2", "tapt.hold_steps=4"]).tapt.total_steps == 12
    # a file's bad value is named with the file, even when an override comes after it
    bad = _yaml(tmp_path, "bad.yaml", "finetune:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: finetune.epochs: must be >= 1, got 0"):
        load_config(bad, overrides=["finetune.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^override 'tapt.hold_steps=20', \S+b.yaml: tapt.warmup_steps \+"):
        load_config(_yaml(tmp_path, "b.yaml", "tapt:\n  total_steps: 12\n"), overrides=["tapt.hold_steps=20"])


def test_from_dict_and_apply_overrides_validate():
    with pytest.raises(ConfigError, match=r"finetune.epochs: must be >= 1, got 0"):
        from_dict({"finetune": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"override 'finetune.lr=0': finetune.lr: must be > 0"):
        apply_overrides(Config(), ["finetune.lr=0"])
    with pytest.raises(ConfigError, match=r"tapt.warmup_steps \+ tapt.hold_steps must be <= tapt.total_steps"):
        apply_overrides(Config(), ["tapt.total_steps=10"])
    assert apply_overrides(Config(), ["tapt.total_steps=10", "tapt.warmup_steps=1", "tapt.hold_steps=2"])


# Config combinations the docs and the test suite compose. `mmser ...` command lines in the docs
# are parsed for their -c files and literal overrides (shell variables and placeholders skipped).
DOCS = ["README.md", "experiments/RESULTS.md", "experiments/ablation_grid.sh", "configs/*.yaml"]
TEST_COMBOS = [
    ("base.yaml", "vft.yaml", "tiny.yaml"),  # tests/helpers.py TINY_CONFIGS
    ("base.yaml", "vft.yaml", "tiny.yaml", "tiny_pretrain.yaml"),
    ("base.yaml", "vft.yaml", "tapt.yaml", "tiny.yaml", "tiny_pretrain.yaml"),
    ("base.yaml", "vft.yaml", "ptapt.yaml", "tiny.yaml", "tiny_pretrain.yaml"),
    ("base.yaml", "vft.yaml", "text.yaml", "tiny.yaml"),  # tests/test_multimodal.py
    ("base.yaml", "vft.yaml", "fusion_concat.yaml", "tiny.yaml"),
    ("base.yaml", "vft.yaml", "fusion_decision.yaml", "tiny.yaml"),
    ("base.yaml", "vft.yaml", "fusion_xattn.yaml", "tiny.yaml"),
]


def _documented_commands() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    root = Path(__file__).resolve().parents[1]
    out = []
    for pattern in DOCS:
        for path in sorted(root.glob(pattern)):
            text = path.read_text().replace("\\\n", " ")
            for line in text.splitlines():
                for cmd in re.findall(r"mmser (?:train|cv|folds)\b[^`|\n]*", line):
                    files = tuple(re.findall(r"-c\s+configs/(\S+\.yaml)", cmd))
                    overrides = tuple(t for t in cmd.split() if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*=[^$\[\]\"']+", t))
                    if files:
                        out.append((files, overrides))
    return out


def test_every_documented_and_tested_config_combination_loads():
    from mmser.demo import experiment_config, experiments

    root = Path(__file__).resolve().parents[1] / "configs"
    documented = _documented_commands()
    assert len(documented) >= 10, documented  # the parser still finds the README's commands
    assert (("base.yaml", "vft.yaml", "ptapt.yaml"), ("ptapt.wav2vec1_checkpoint=wav2vec_large.pt",)) in documented
    for files, overrides in documented + [(c, ()) for c in TEST_COMBOS]:
        load_config(*(root / f for f in files), overrides=list(overrides))
    for exp in experiments(Path("asr.jsonl"), Path("runs/vft")):  # `mmser demo`'s grid
        experiment_config(exp, ["data.manifest=m.jsonl", "output_dir=runs", "tracking.wandb=disabled"])
