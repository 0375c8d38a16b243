"""Installing mmser anywhere (issue 12): the configs ship inside the wheel, `-c NAME` resolves to a
packaged config, and `mmser config show/list` print what a command would use.

The wheel test builds from a copy of the package in tmp_path (no build/ folder in the tree) and
imports the installed copy from a folder outside the clone, so a `configs/` next to the sources
cannot hide a missing package-data entry (about 5 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from mmser.cli import main
from mmser.config import PACKAGED_CONFIGS, ConfigError, load_config, packaged_configs, resolve_config_path

REPO = Path(__file__).resolve().parents[1]


def test_configs_symlink_points_into_the_package():
    # configs/ is kept for the README's `-c configs/vft.yaml` commands; the files live in the package.
    assert (REPO / "configs").resolve() == PACKAGED_CONFIGS
    assert {p.name for p in (REPO / "configs").glob("*.yaml")} == {p.name for p in PACKAGED_CONFIGS.glob("*.yaml")}
    assert "vft" in packaged_configs() and "base" in packaged_configs()


def test_bare_name_resolves_to_the_packaged_file_and_a_path_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the clone: `configs/` is not in the working folder
    assert resolve_config_path("vft") == PACKAGED_CONFIGS / "vft.yaml"
    assert resolve_config_path("my.yaml") == Path("my.yaml")
    assert resolve_config_path("sub/vft") == Path("sub/vft")
    by_name = load_config("base", "vft", "tiny", overrides=["finetune.epochs=3"])
    by_path = load_config(*(PACKAGED_CONFIGS / f"{n}.yaml" for n in ("base", "vft", "tiny")),
                          overrides=["finetune.epochs=3"])
    assert by_name == by_path and by_name.finetune.epochs == 3
    with pytest.raises(ConfigError, match="no packaged config named 'nope'.*vft"):
        load_config("nope")


def test_config_show_prints_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "-c", "base", "-c", "vft", "finetune.epochs=7", "-c", "tiny"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("base", "vft", "tiny", overrides=["finetune.epochs=7"])
    assert shown["finetune"]["epochs"] == 7
    assert shown["encoder"]["name"] == expected.encoder.name


def test_config_show_with_an_unknown_name_is_one_line(capsys):
    assert main(["config", "show", "-c", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmser: error: no packaged config named 'nope'") and err.count("\n") == 1


def test_config_list_names_every_packaged_config_with_its_first_comment_line(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(packaged_configs())
    vft = next(line for line in out if line.startswith("vft "))
    assert "V-FT: vanilla fine-tuning" in vft


def test_wheel_ships_the_configs_and_the_installed_demo_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mmser", src / "mmser", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("mmser-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mmser/configs/{p.name}" for p in PACKAGED_CONFIGS.glob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "mmser/py.typed" in names  # PEP 561 marker: type checkers read the installed hints

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # a wheel is a zip laid out as site-packages
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import mmser, mmser.demo as d; from pathlib import Path; "
            "assert Path(mmser.__file__).is_relative_to(Path.cwd().parent / 'site'), mmser.__file__; "
            "exp = d.experiments(Path('asr.jsonl'), Path('runs/vft'))[0]; "
            "cfg = d.experiment_config(exp, ['data.manifest=m.jsonl', 'tracking.wandb=disabled']); "
            "from mmser.config import load_config; load_config('vft'); print(cfg.experiment)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vft"
