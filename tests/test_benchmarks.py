"""The benchmark harness: a ``--quick`` smoke run end to end, and its models checked by hand."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import ablation, convergence, memory, readme, refresh_hiding, report, run, scaling
from benchmarks.flops import forward_backward_flops, shampoo_step_flops
from benchmarks.harness import FigureResult, Table
from benchmarks.roots_bench import (
    BASELINE,
    EXPONENT,
    METHODS,
    RIDGE,
    accumulated_statistics,
    spd_with_condition,
)
from benchmarks.run import FIGURES
from lightning_shampoo import Shampoo

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    # A copy of the README, named explicitly: a quick run must leave it alone all the same.
    readme_copy = out / "README.md"
    readme_copy.write_text(readme.README.read_text())
    done = subprocess.run(
        # One thread: two OpenMP threads on two cores stall whenever another process takes a core, and the
        # smoke run checks the harness, not the machine.
        [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--out", str(out),
         "--readme", str(readme_copy)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert readme_copy.read_text() == readme.README.read_text()
    return out, done.stdout


def test_quick_run_records_every_figure(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    record = json.loads((out / "results.json").read_text())
    machine = record["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1
    assert machine["cpu_count"] >= 1 and machine["platform"] and machine["date"]
    assert [f["name"] for f in record["figures"]] == [f.name for f in FIGURES]
    markdown = (out / "results.md").read_text()
    for figure in record["figures"]:
        assert figure["machine"]["torch_threads"] == 1 and figure["machine"]["seconds"] >= 0
        assert figure["machine"]["omp_wait_policy"] == "PASSIVE"  # set by the harness in a fresh process
        assert f"`{figure['name']}`" in markdown
        assert figure["status"] == "done" and figure["tables"] and figure["plots"]
        for table in figure["tables"]:
            assert table["title"] in markdown
            assert all(len(row) == len(table["columns"]) for row in table["rows"])
        for plot in figure["plots"]:
            assert (out / plot).read_bytes()[:8] == PNG_MAGIC
    # Progress: one line per measurement, tagged with its figure.
    assert stdout.count("[step_time] mlp | AdamW | round") == 2
    assert "[inverse_root] size 128" in stdout and "[convergence] digits |" in stdout
    assert "[refresh_hiding] round 1/1, async: median" in stdout
    assert "[scaling] 2 ranks, sharded: factor memory" in stdout
    # The README block renders from a fresh record too.
    assert "Not measured yet" not in readme.render(record, "results")


def _figure(out: Path, name: str) -> dict:
    return next(f for f in json.loads((out / "results.json").read_text())["figures"] if f["name"] == name)


def test_quick_refresh_hiding_times_every_configuration(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    figure = _figure(out, "refresh_hiding")
    plan = refresh_hiding.QUICK
    runs = {r["label"]: r for r in figure["data"]["runs"]}
    # One thread: the worker cannot have cores of its own, so there is no "shared cores" variant.
    assert list(runs) == ["sync", "async", "control: no refresh after step 1"]
    assert [r["refresh"] for r in runs.values()] == ["sync", "async", "sync"]
    for r in runs.values():
        assert len(r["rounds"]) == plan.rounds
        for measured in r["rounds"]:
            assert len(measured["step_ms"]) == plan.steps and measured["refreshes_timed"] == plan.periods
            assert measured["median_ms"] == pytest.approx(statistics.median(measured["step_ms"]), abs=1e-3)
        assert r["max_ms"] == pytest.approx(max(t for m in r["rounds"] for t in m["step_ms"]), abs=1e-3)
    rows = {row[0]: row for row in figure["tables"][0]["rows"]}
    assert rows["async"][-1].startswith("p99/median ≤1.25: ") and rows["sync"][-1] == ""


def test_quick_convergence_schedules_every_task(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = _figure(out, "convergence")["data"]
    assert list(data) == ["digits", "char_lm", "char_lm_8k"]
    for record in data.values():  # the quick tasks run 40 steps: warmup 2, cosine to 10% at step 40
        assert record["schedule"] == {"warmup_steps": 2, "total_steps": 40, "final_fraction": 0.1}
        assert set(record["best"]) == {"AdamW", "Shampoo"}


def test_quick_ablation_compares_every_configuration_with_adamw(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    figure = _figure(out, "ablation")
    names = ["AdamW", *ablation.CONFIGURATIONS]
    for make in convergence.TASKS:
        task = make(True, torch.device("cpu"))
        entries = figure["data"][task.name]["entries"]
        assert list(entries) == names
        for name, entry in entries.items():
            if "unavailable" in entry:  # not taken by the installed Shampoo, or failed in training
                assert entry["unavailable"].startswith(("unavailable: ", "failed: "))
                continue
            family = "AdamW" if name == "AdamW" else "Shampoo"
            assert [point["lr"] for point in entry["sweep"]] == list(task.short_lrs[family])
        assert f"[ablation] {task.name} | AdamW lr" in stdout
    best = figure["tables"][0]
    assert [row[:2] for row in best["rows"]] == [[task, name] for task in figure["data"] for name in names]
    columns, rows, _ = readme.SUMMARIES[ablation.NAME](figure)
    assert len(rows) == len(best["rows"]) and all(len(row) == len(columns) for row in rows)
    assert all(row[3] == "1×" for row in rows if row[1] == "AdamW")


def test_quick_scaling_splits_the_factors(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    per_rank = _figure(out, "scaling")["data"]["per_rank"]
    config = scaling.QUICK
    # At block_size 32: 4 blocks per Linear(64, 64) and 16×2 of the 512×64 head, each with 2 factors and 2
    # roots of 32×32; fp32.
    blocks = config.layers * 4 + 32
    total = blocks * 4 * 32 * 32 * 4
    assert [r["factor_bytes"] for r in per_rank["1 rank"]] == [total]
    assert [r["factor_bytes"] for r in per_rank["2 ranks, replicated"]] == [total, total]
    for label, ranks in (("2 ranks, sharded", 2), ("4 ranks, sharded", 4)):
        sharded = [r["factor_bytes"] for r in per_rank[label]]
        # The head, over half of the work, is split by blocks: every rank within a block of its share.
        assert sum(sharded) == total and max(sharded) <= total / ranks + 4 * 32 * 32 * 4
        assert all(r["split"] == [config.layers] for r in per_rank[label])
    timed = [r["refreshes_timed"] for ranks in per_rank.values() for r in ranks]
    assert timed == [config.steps // config.frequency] * 9


def test_quick_step_time_ratios_are_side_by_side(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    figures = json.loads((out / "results.json").read_text())["figures"]
    figure = next(f for f in figures if f["name"] == "step_time")
    # The 8k-token LM times what its iteration goal needs only.
    assert set(figure["data"]["lm_8k"]["runs"]) == {"AdamW", "Shampoo f10", "Shampoo f100"}
    for workload in ("mlp", "lm", "lm_8k"):
        runs = figure["data"][workload]["runs"]
        assert runs["AdamW"]["step_mean_ratio"] == 1.0
        shampoo = runs["Shampoo f100"]
        ratio = shampoo["step_mean_ms"] / runs["AdamW"]["step_mean_ms"]
        assert shampoo["step_mean_ratio"] == pytest.approx(ratio)
        bound = shampoo["flop_model"]
        assert bound["iteration_ratio_bound"] == pytest.approx(
            1 + bound["optimizer_gflop"] / bound["forward_backward_gflop"]
        )


def test_quick_inverse_root_figure_compares_every_method_and_basis_path(quick_run: tuple[Path, str]) -> None:
    data = _figure(quick_run[0], "inverse_root")["data"]
    for table in ("accuracy", "speed", "context"):
        assert [r["method"] for r in data[table]][: len(METHODS)] == list(METHODS)
    for record in data["speed"]:
        if record["method"] == BASELINE:
            assert record["ratio"] == 1.0 and record["fallbacks"] == 0  # no fp32 failure on sound input
    # The in-context errors are set beside fp64 eigh's, which is the fp32 statistics' own.
    assert all(r["over_storage"] == 1.0 for r in data["context"] if r["method"] == "eigh fp64")
    # Each timed eigenbasis call took the path it is named after, for every matrix of its batch.
    assert {r["path"] for r in data["eigenbasis"]} == {"full", "warm", "kept"}
    assert all(r["on_path"] == r["batch"] for r in data["eigenbasis"])


def test_flop_model_counts_blocks_by_hand() -> None:
    params = [
        torch.empty(300, 2048),  # split into two 300×1024 blocks
        torch.empty(300),  # a 1-D factor
        torch.empty(1, 512),  # squeezed to 1-D
        torch.empty(96, 5000),  # 5000 > max_preconditioned_dim: only the 96 side has a factor
    ]
    expected = (
        2 * 4 * 300 * 1024 * (300 + 1024)
        + 4 * 300 * 300
        + 4 * 512 * 512
        + 4 * 96 * 96 * 5000
    )
    classic = dict(block_size=1024, max_factor_ratio=None)
    assert shampoo_step_flops(params, max_preconditioned_dim=2048, **classic) == expected
    assert shampoo_step_flops(params[:1], precondition_1d=False, **classic) == 2 * 4 * 300 * 1024 * 1324
    assert shampoo_step_flops(params[1:3], precondition_1d=False, **classic) == 0
    # The factor-ratio rule (default 4) drops the 1-D factors; eigenvalue correction adds a mode product.
    assert shampoo_step_flops(params[:3], block_size=1024) == 2 * 4 * 300 * 1024 * 1324
    corrected = shampoo_step_flops(params[:1], "eigenvalue_corrected", block_size=1024)
    assert corrected == 2 * 6 * 300 * 1024 * 1324
    assert forward_backward_flops(params[:2], tokens=7) == 6 * 7 * (300 * 2048 + 300)


def test_state_bytes_match_the_layout() -> None:
    model = nn.Linear(48, 40)  # 40·48 > block_size: the weight keeps both dims (no merge)
    model(torch.randn(4, 48)).sum().backward()
    n = 48 * 40 + 40
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    # exp_avg + exp_avg_sq in fp32, plus a 4-byte step tensor per parameter.
    assert memory.state_bytes(adamw) == {"moments": 8 * n, "other": 2 * 4}
    for ratio, factored in ((None, 40**2 + 48**2 + 40**2), (4.0, 40**2 + 48**2)):
        shampoo = Shampoo(model.parameters(), max_factor_ratio=ratio)
        shampoo.step()
        shampoo.close()
        found = memory.state_bytes(shampoo)
        assert found["moments"] == 2 * 4 * n  # exp_avg and graft_sq
        # A factor and a root per dim, fp32: 40² and 48² for the weight, and (classic rules) 40² for the bias.
        assert found["factors"] == found["roots"] == 4 * factored
    compact = Shampoo(model.parameters(), factor_dtype=torch.bfloat16, max_factor_ratio=4.0)
    compact.step()
    compact.close()
    found = memory.state_bytes(compact)
    triangles = 40 * 41 // 2 + 48 * 49 // 2  # upper triangles: fp32 factors, bf16 roots
    assert (found["factors"], found["roots"]) == (4 * triangles, 2 * triangles)


def test_test_matrices_have_the_requested_spectrum_and_root() -> None:
    matrices, roots = spd_with_condition(24, 1e6, torch.Generator().manual_seed(1), batch=2)
    eigenvalues = torch.linalg.eigvalsh(matrices)
    assert eigenvalues.amax(-1) == pytest.approx([1.0, 1.0], rel=1e-9)
    assert (eigenvalues.amax(-1) / eigenvalues.amin(-1)) == pytest.approx([1e6, 1e6], rel=1e-6)
    regularized = matrices + RIDGE * torch.eye(24, dtype=torch.float64)
    inverted = torch.linalg.matrix_power(roots, -EXPONENT)
    torch.testing.assert_close(inverted, regularized, rtol=0, atol=1e-9)


def test_accumulated_statistics_differ_only_by_float32_rounding() -> None:
    exact, stored = accumulated_statistics(24, 1e4, 50, torch.Generator().manual_seed(2))
    assert exact.dtype == torch.float64 and stored.dtype == torch.float32
    assert torch.equal(exact, exact.mT) and torch.linalg.eigvalsh(exact).min() > 0  # 50·32 columns ≫ 24
    difference = torch.linalg.matrix_norm(stored.double() - exact) / torch.linalg.matrix_norm(exact)
    assert 0 < difference < 1e-5  # rounding of G and of each update, accumulated over 50 steps


def test_report_merges_a_partial_run(tmp_path: Path) -> None:
    order = ["first", "second"]
    machine = {"date": "d", "platform": "p", "processor": "x", "cpu_count": 2, "torch_threads": 2,
               "device": "cpu", "torch": "t", "python": "3", "load_average_1m": 0.0,
               "load_average_1m_end": 0.0, "seconds": 1.0}
    table = Table("T", ["a", "b", "c"], [[1.5, "x|y", float("inf")]])
    second = FigureResult("second", "Second", tables=[table], machine=machine)
    report.write(tmp_path, order, [second], machine)
    report.write(tmp_path, order, [FigureResult("first", "First", status="pending: needs z")], machine)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [(f["name"], f["number"]) for f in record["figures"]] == [("first", 1), ("second", 2)]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.index("Figure 1: First") < markdown.index("Figure 2: Second")
    assert "| 1.5 | x\\|y | ∞ |" in markdown and "*pending: needs z*" in markdown


def test_refresh_hiding_distribution_by_hand() -> None:
    assert [step for step in range(1, 12) if refresh_hiding.is_refresh_step(step, 5)] == [1, 6, 11]
    # Steps 4..13 at frequency 5: steps 6 and 11 refresh (10 s and 30 s); the rest take 1 s.
    seconds = [1.0, 1.0, 10.0, 1.0, 1.0, 1.0, 1.0, 30.0, 1.0, 1.0]
    found = refresh_hiding.distribution(seconds, first_step=4, frequency=5)
    assert found["median_ms"] == 1e3 and found["max_ms"] == 3e4 and found["mean_ms"] == 4.8e3
    assert found["refresh_step_median_ms"] == 2e4 and found["refreshes_timed"] == 2
    # Inclusive p99 of 10 values: at rank 0.99·9 = 8.91 between the sorted 10 s and 30 s.
    assert found["p99_ms"] == pytest.approx(1e3 * (10 + 0.91 * 20))


def test_refresh_hiding_summary_takes_medians_over_rounds() -> None:
    config = refresh_hiding.Config("async", "async", 1, 1)

    def measured(median: float, p99: float, biggest: float, wait: float) -> dict[str, float]:
        return {"median_ms": median, "mean_ms": median, "p99_ms": p99, "max_ms": biggest,
                "p99_over_median": p99 / median, "refresh_step_over_median": 1.0, "latency_s": 0.5,
                "wait_s": wait}

    rounds = [measured(10.0, 12.0, 13.0, 0.0), measured(10.0, 20.0, 40.0, 0.2),
              measured(12.0, 13.2, 14.0, 0.1)]
    summary = refresh_hiding.summarize(config, rounds, frequency=50)
    assert summary["median_ms"] == 10.0 and summary["p99_ms"] == 13.2
    assert summary["p99_over_median"] == pytest.approx(1.2)  # the ratios 1.2, 2.0, 1.1: their median
    assert (summary["p99_over_median_min"], summary["p99_over_median_max"]) == pytest.approx((1.1, 2.0))
    assert refresh_hiding.spread(summary) == "1.10–2.00"
    assert summary["max_ms"] == 40.0 and summary["wait_s"] == 0.2
    assert summary["lag_window_s"] == pytest.approx(0.5) and summary["rounds"] == rounds
    assert refresh_hiding.goal_cell(summary) == "p99/median ≤1.25: met"


def test_scaling_summary_takes_the_most_loaded_rank() -> None:
    def rank(value: float) -> dict[str, float]:
        return dict.fromkeys(("factor_bytes", "refresh_s", "refresh_cpu_s", "step_s", "step_cpu_s"), value)

    runs = {"1 rank": [rank(8.0)], "2 ranks, sharded": [rank(3.0), rank(5.0)],
            "2 ranks, replicated": [rank(10.0), rank(9.0)],
            "4 ranks, sharded": [rank(1.0), rank(2.0), rank(2.5), rank(0.5)]}
    summary = scaling.summary(runs)["refresh_cpu_s"]
    assert summary["one_over_two"] == 8 / 5 and summary["sharded_over_replicated"] == 5 / 10
    assert summary["one_over_four"] == 8 / 2.5
    assert scaling.ROWS[2][3].verdict(summary) == (
        "1 rank / 2 sharded ≥1.8: missed by 1.12×; 1 rank / 4 sharded ≥3.5: missed by 1.09×"
    )


def test_readme_block_is_generated_from_the_committed_results() -> None:
    text = readme.README.read_text()
    assert text.count(readme.BEGIN) == text.count(readme.END) == 1
    assert readme.expected(readme.README, report.RESULTS_DIR) == text, "run `python -m benchmarks.readme`"


def test_readme_update_keeps_the_prose_around_the_block(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    pending = FigureResult("scaling", "Scaling", status="pending: needs z")
    report.write(results, ["scaling"], [pending], {})
    target = tmp_path / "README.md"
    target.write_text(f"# T\n\nbefore\n{readme.BEGIN}\nold\n{readme.END}\nafter\n")
    assert readme.update(target, results)
    text = target.read_text()
    assert text.startswith("# T\n\nbefore\n" + readme.BEGIN) and text.endswith(readme.END + "\nafter\n")
    assert "old" not in text and "Not measured yet (pending: needs z)." in text
    assert "[results.md](results/results.md)" in text
    assert not readme.update(target, results)  # already up to date


def test_only_runs_into_the_committed_folder_touch_the_readme(tmp_path: Path) -> None:
    assert run.parse_args([]).readme == readme.README
    assert run.parse_args([]).out == run.DEFAULT_OUT == report.RESULTS_DIR
    # A smoke run goes to a git-ignored scratch folder, never over the committed results.
    quick = run.parse_args(["--quick"])
    assert quick.out == run.QUICK_OUT and quick.readme is None
    assert REPO / "runs" in run.QUICK_OUT.parents
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()
    assert run.parse_args(["--out", str(tmp_path)]).readme is None
    assert run.parse_args(["--out", str(tmp_path), "--readme", "R.md"]).readme == Path("R.md")
