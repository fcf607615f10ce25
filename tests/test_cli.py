"""The ``lightning-shampoo`` CLI: every recipe YAML runs a few steps (each Shampoo recipe with its twin)."""

from __future__ import annotations

import math
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from lightning_shampoo.cli import main, run, twin_args

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# A fast-dev-run style schedule: 2 batches per epoch, so step 3 follows an epoch end (an epoch-end refresh).
FAST = [
    "--trainer.max_steps=4",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.val_check_interval=2",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
]

# Lightning recipes are the YAMLs with a model (the folder also holds e.g. accelerate configs).
LIGHTNING_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml") if "model" in yaml.safe_load(p.read_text()))
SHAMPOO_RECIPES = [name for name in LIGHTNING_RECIPES if "shampoo" in name]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs write their outputs (config.yaml, runs/) into the test's folder; pytest's argv is not theirs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo"])


def test_every_recipe_is_a_shampoo_recipe_or_its_adamw_twin() -> None:
    twins = [yaml.safe_load((RECIPES / name).read_text())["twin"] for name in SHAMPOO_RECIPES]
    assert twins == [name.replace("shampoo", "adamw") for name in SHAMPOO_RECIPES]
    assert sorted(SHAMPOO_RECIPES + twins) == LIGHTNING_RECIPES
    assert "char_lm_shampoo.yaml" in SHAMPOO_RECIPES and "digits_shampoo.yaml" in SHAMPOO_RECIPES


@pytest.mark.parametrize("recipe", SHAMPOO_RECIPES)
def test_recipe_and_its_twin_run_and_plot(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "loss.png"
    reports = run(["fit", "--config", str(RECIPES / recipe), *FAST, f"--plot={plot}"])
    assert [report.label for report in reports] == ["Shampoo", "AdamW"]
    for report in reports:
        # The command-line overrides reach the twin too.
        assert report.steps == [1, 2, 3, 4]
        assert all(math.isfinite(loss) for loss in report.losses)
        assert {"val_loss", "val_acc"} <= set(report.final_metrics)
        assert report.items > 0
    assert reports[0].shampoo["refreshes"] >= 1
    unit = "tokens" if recipe.startswith("char_lm") else "samples"
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("Shampoo: 4 steps") and "refreshes" in line and f"{unit}/s" in line for line in lines
    )
    assert any(line.startswith("AdamW: 4 steps") and f"{unit}/s" in line for line in lines)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_twin_args_replace_only_the_recipe() -> None:
    assert twin_args(["fit", "--config", "a.yaml", "--x=1"], "b.yaml") == [
        "fit",
        "--config",
        "b.yaml",
        "--x=1",
    ]
    assert twin_args(["fit", "-c=a.yaml", "--config", "c.yaml"], "b.yaml") == [
        "fit",
        "--config",
        "b.yaml",
        "--config",
        "c.yaml",
    ]
    with pytest.raises(ValueError, match="give the recipe with --config"):
        twin_args(["fit", "--model=X"], "b.yaml")


def test_console_script_is_installed_and_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning-shampoo"]
    assert script.load() is main
    assert (Path(sys.executable).parent / "lightning-shampoo").is_file()
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--twin" in help_text and "--plot" in help_text
