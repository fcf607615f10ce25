"""The ``lightning-shampoo`` CLI: every recipe YAML runs a few steps (each Shampoo recipe with its twin),
the optimizer and schedule options reach the recipe modules, plots are per run, and the console script
arranges CPU threads without a library import touching the environment."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from lightning_shampoo import _cpu
from lightning_shampoo.__main__ import main
from lightning_shampoo._extras import MissingExtra, Requirement, check_requirements
from lightning_shampoo.cli import plot_path, route_optimizer_and_scheduler, run, twin_args
from lightning_shampoo.recipes import Digits

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
    for command in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            run(command)
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        # Where the recipes are, what they are called, how to run one, and the options of this CLI.
        assert str(RECIPES) in help_text
        assert all(name in help_text for name in LIGHTNING_RECIPES)
        assert f"lightning-shampoo fit --config {RECIPES}/char_lm_shampoo.yaml" in help_text
        for option in ("--twin", "--plot", "--lr_scheduler", "OMP_WAIT_POLICY"):
            assert option in help_text


DIGITS_ALONE = [
    "fit", "--config", str(RECIPES / "digits_shampoo.yaml"), "--twin=null", "--plot=null", *FAST
]
# Full class paths: a short name is ambiguous once e.g. heavyball (the bench extra) defines its own SGD.
COSINE = ["--lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR", "--lr_scheduler.T_max=4"]


def recipe_lr(name: str) -> float:
    """The base learning rate a recipe's YAML gives its optimizer."""
    model = yaml.safe_load((RECIPES / name).read_text())["model"]
    return float(model["init_args"]["optimizer"]["init_args"]["lr"])


def test_lr_scheduler_on_the_command_line_changes_the_trajectory_and_the_logged_lr() -> None:
    (constant,) = run([*DIGITS_ALONE, "--model.scheduler=null"])
    twin = f"--twin={RECIPES / 'digits_adamw.yaml'}"
    shampoo, adamw = run([*DIGITS_ALONE, "--model.scheduler=null", twin, *COSINE])
    # Step 1 runs at the base rate either way; from step 2 on the rates and so the losses differ.
    assert shampoo.losses[0] == constant.losses[0] and shampoo.losses[1:] != constant.losses[1:]
    assert constant.final_metrics["lr"] == pytest.approx(recipe_lr("digits_shampoo.yaml"))
    # The rate of step 4 (logged by the module), after 3 per-step cosine steps of T_max=4; the twin too.
    cosine = (1 + math.cos(math.pi * 3 / 4)) / 2
    assert shampoo.final_metrics["lr"] == pytest.approx(recipe_lr("digits_shampoo.yaml") * cosine)
    assert adamw.final_metrics["lr"] == pytest.approx(recipe_lr("digits_adamw.yaml") * cosine)


def test_recipe_schedule_ends_with_the_run() -> None:
    recipe = RECIPES / "char_lm_shampoo.yaml"
    schedule = yaml.safe_load(recipe.read_text())["model"]["init_args"]["scheduler"]
    assert schedule["class_path"].endswith("WarmupCosine") and "total_steps" not in schedule["init_args"]
    warmup, final = schedule["init_args"]["warmup_steps"], schedule["init_args"]["final_lr_ratio"]
    steps = warmup + 2
    short = [f"--trainer.max_steps={steps}", "--data.init_args.max_bytes=100000"]
    (report,) = run(["fit", "--config", str(recipe), "--twin=null", "--plot=null", *FAST, *short])
    # The horizon is the run's own length: its last step runs just above the floor of the decay.
    cosine = (1 + math.cos(math.pi * (steps - 1 - warmup) / (steps - warmup))) / 2
    expected = recipe_lr(recipe.name) * (final + (1 - final) * cosine)
    assert report.final_metrics["lr"] == pytest.approx(expected)


def test_top_level_optimizer_is_built_by_the_recipe_module(recwarn: pytest.WarningsRecorder) -> None:
    (report,) = run([*DIGITS_ALONE, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.05", *COSINE])
    assert report.label == "SGD"
    assert report.final_metrics["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    # The module's configure_optimizers built it: LightningCLI did not replace the method.
    assert not [w for w in recwarn if "configure_optimizers` will be overridden" in str(w.message)]


def test_routing_keeps_lightning_behaviour_for_other_models_but_refuses_a_lone_schedule() -> None:
    schedule = Namespace(class_path="torch.optim.lr_scheduler.StepLR", init_args=Namespace(step_size=1))
    recipe = Namespace(
        model=Namespace(class_path="R", init_args=Namespace(optimizer=None, scheduler=None)),
        optimizer=None,
        lr_scheduler=schedule,
    )
    route_optimizer_and_scheduler(recipe)
    assert recipe.model.init_args.scheduler is schedule and recipe.lr_scheduler is None
    model = Namespace(class_path="M", init_args=Namespace())
    other = Namespace(model=model, optimizer=None, lr_scheduler=schedule)
    with pytest.raises(ValueError, match="--lr_scheduler needs --optimizer"):
        route_optimizer_and_scheduler(other)
    other.optimizer = Namespace(class_path="torch.optim.SGD", init_args=Namespace(lr=0.1))
    route_optimizer_and_scheduler(other)  # both given: LightningCLI's own configure_optimizers takes them
    assert other.lr_scheduler is schedule


def test_plot_true_draws_into_each_runs_log_folder(tmp_path: Path) -> None:
    with_logger = [arg for arg in DIGITS_ALONE if arg not in ("--plot=null", "--trainer.logger=false")]
    for _ in range(2):
        run([*with_logger, "--plot=true"])
    plots = sorted(tmp_path.glob("runs/digits_shampoo/version_*/loss.png"))
    assert [p.parent.name for p in plots] == ["version_0", "version_1"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    assert plot_path(None, "d") is None and plot_path(False, "d") is None
    assert plot_path(True, "runs/x/version_3") == Path("runs/x/version_3/loss.png")
    assert plot_path("a/b.png", "d") == Path("a/b.png")


def test_a_missing_optional_dependency_names_the_extra() -> None:
    class NeedsSomething:
        requires = (Requirement("sklearn", "scikit-learn", "Digits"), Requirement("no_such.mod", "nsp", "X"))

    with pytest.raises(MissingExtra, match=r"^X needs nsp, .*: pip install 'lightning-shampoo\[recipes\]'"):
        check_requirements(NeedsSomething)
    check_requirements(Digits)  # installed here (the bare install's CI step checks the message)


# ------------------------------------------------------------------------------------------- CPU threads


def test_thread_plan_splits_cores_and_leaves_what_the_user_set() -> None:
    plan = _cpu.plan_threads
    assert plan(8, 1, background_refresh=True, environ={}) == _cpu.ThreadPlan(7, 1)
    assert plan(8, 1, background_refresh=False, environ={}) == _cpu.ThreadPlan(None, None)  # nothing to do
    assert plan(8, 2, background_refresh=True, environ={}) == _cpu.ThreadPlan(3, 1)
    assert plan(8, 2, background_refresh=False, environ={}) == _cpu.ThreadPlan(4, None)
    # Under SPLIT_FROM cores per process the worker shares training's.
    assert plan(_cpu.SPLIT_FROM - 1, 1, background_refresh=True, environ={}) == _cpu.ThreadPlan(None, None)
    assert plan(4, 2, background_refresh=True, environ={}) == _cpu.ThreadPlan(2, None)
    assert plan(8, 1, True, environ={"OMP_NUM_THREADS": "3"}) == _cpu.ThreadPlan(None, 1)
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _cpu.set_wait_policy(environ, load=5.0) == "ACTIVE"  # the user's choice wins
    # PASSIVE only on a busy machine; a free one keeps OpenMP's default (spin briefly, then sleep).
    busy, free = {}, {}
    assert _cpu.set_wait_policy(busy, load=_cpu.BUSY_LOAD) == "PASSIVE" == busy["OMP_WAIT_POLICY"]
    assert _cpu.set_wait_policy(free, load=0.2) == "default" and not free


def test_library_imports_leave_torch_and_the_environment_alone() -> None:
    code = (
        "import os, sys; before = dict(os.environ)\n"
        "import lightning_shampoo, lightning_shampoo.__main__\n"
        "assert 'torch' not in sys.modules, 'the console script sets OpenMP variables before torch loads'\n"
        "from lightning_shampoo import Shampoo\n"
        "import lightning_shampoo.cli\n"
        "assert dict(os.environ) == before\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


# The console script in a fresh process, then what the process ended with.
CONSOLE = (
    "import os, sys\n"
    "from lightning_shampoo.__main__ import main\n"
    "sys.argv = ['lightning-shampoo', *sys.argv[1:]]\n"
    "main()\n"
    "import torch\n"
    "print('STATE ' + repr((torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))))\n"
)
# On CPU whatever the machine has, refreshing in the background.
ASYNC = [
    "--trainer.accelerator=cpu",
    "--model.optimizer.init_args.refresh=async",
    "--model.optimizer.init_args.refresh_lag=1",
]


def console(args: list[str], env: dict[str, str], cwd: Path) -> tuple[str, tuple[int, str], dict]:
    """Runs the console script on ``args``; returns its output, (torch threads, wait policy) at the end,
    and the optimizer's init_args of the saved config."""
    done = subprocess.run(
        [sys.executable, "-c", CONSOLE, *args],
        env=env, cwd=cwd, capture_output=True, text=True, check=False, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    (state,) = [line[6:] for line in done.stdout.splitlines() if line.startswith("STATE ")]
    saved = yaml.safe_load((cwd / "config.yaml").read_text())
    return output, eval(state), saved["model"]["init_args"]["optimizer"]["init_args"]


def test_console_script_sets_the_wait_policy_and_splits_cores_for_an_async_refresh(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    default = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env, capture_output=True, text=True, check=True,
    )
    plan = _cpu.plan_threads(int(default.stdout), 1, background_refresh=True, environ={})
    output, (threads, policy), optimizer = console([*DIGITS_ALONE, *ASYNC], env, tmp_path)
    assert policy in (None, "PASSIVE")  # by the machine's load when the script started (unit-tested above)
    assert (threads, optimizer["refresh_threads"]) == (plan.training or int(default.stdout), plan.refresh)
    leftover = ", Shampoo's refresh worker on the cores they leave"
    worker = f" + {plan.refresh} for" if plan.refresh else leftover
    assert f"CPU training with {threads} torch thread(s) per process{worker}" in output
    assert f"OMP_WAIT_POLICY={policy or 'unset'}" in output


def test_console_script_keeps_what_the_user_set(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    args = [*DIGITS_ALONE, *ASYNC, "--model.optimizer.init_args.refresh_threads=2"]
    output, (threads, policy), optimizer = console(args, env, tmp_path)
    assert (threads, policy, optimizer["refresh_threads"]) == (1, "ACTIVE", 2)
    assert "1 torch thread(s) per process + 2 for Shampoo's refresh worker, OMP_WAIT_POLICY=ACTIVE" in output
