"""The README's results block, generated from ``benchmarks/results/results.json``.

``python -m benchmarks.readme`` replaces the text between :data:`BEGIN` and :data:`END` in README.md
with one short table per figure (its headline ratios and goal verdicts), links to ``results.md`` and the
plots, and where and when each figure was measured. ``python -m benchmarks.run`` does the same at the
end of a run that is not ``--quick`` into the default folder. Prose that is not generated from the
numbers stays outside the markers.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import ablation, convergence, memory, refresh_hiding, report, roots_bench, scaling, step_time
from .harness import goal_verdict

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
HEADLINE_FREQUENCY = 100  # the step-time figure's runs in the README: those of issue 2's goal

Figure = dict[str, Any]  # one figure of a results.json record
Summary = tuple[list[str], list[list[Any]], list[str]]  # columns, rows, notes


def times(value: Any) -> str:
    """A ratio as ``1.23×`` (``∞×`` for the ``"inf"`` of results.json)."""
    return f"{report.format_cell(float(value))}×"


def goal(name: str, measured: Any, target: float, *, at_most: bool) -> str:
    sign = "≤" if at_most else "≥"
    return f"{name} {sign}{target:g}×: {goal_verdict(float(measured), target, at_most=at_most)}"


def _step_time_row(workload: str, label: str, run: dict[str, Any]) -> list[Any]:
    goals = []
    if workload == "mlp" and label.startswith("Shampoo"):
        goals.append(goal("step", run["step_mean_ratio"], step_time.MLP_STEP_GOAL, at_most=True))
    if workload == "lm_8k" and label.startswith("Shampoo"):
        ratio = run["iteration_mean_ratio"]
        goals.append(goal("iteration", ratio, step_time.LM_8K_ITERATION_GOAL, at_most=True))
    flops = run.get("flop_model")
    if flops:
        goals.append(goal("bound", flops["iteration_mean_over_bound"], step_time.BOUND_GOAL, at_most=True))
    bound = times(flops["iteration_mean_over_bound"]) if flops else None
    return [workload, label, times(run["step_mean_ratio"]), times(run["iteration_mean_ratio"]), bound,
            "; ".join(goals)]


def _step_time(figure: Figure) -> Summary:
    rows: list[list[Any]] = []
    notes = ["Means per step, refreshes included; bound: the measured iteration ratio over the flop-model "
             "bound (statistics + preconditioning vs forward+backward)."]
    unavailable: dict[str, set[str]] = {}
    for workload, record in figure["data"].items():
        runs = record["runs"]
        for label, run in runs.items():
            if "unavailable" in run:
                unavailable.setdefault(run["unavailable"], set()).add(label.rsplit(" f", 1)[0])
            elif f" f{HEADLINE_FREQUENCY} " in f" {label} ":
                rows.append(_step_time_row(workload, label, run))
        slowest = {label: run["step_max_ms"] for label, run in runs.items()
                   if " f10 " in f" {label} " and "step_max_ms" in run}
        if workload == "mlp" and slowest:
            notes.append("The mlp's slowest step at frequency 10: " + ", ".join(
                f"{label} {report.format_cell(ms)} ms" for label, ms in slowest.items()
            ) + f" (goal ≤{step_time.SLOWEST_STEP_GOAL_MS:g} ms).")
        sync = runs.get(f"Shampoo f{HEADLINE_FREQUENCY}", {})
        if workload == "mlp" and "flop_model" in sync:
            bound = sync["flop_model"]["step_bound_ms"] / runs["AdamW"]["step_mean_ms"]
            notes.append(f"The flop model alone puts the mlp step at {times(bound)} AdamW's.")
    notes += [f"Not measured, {reason}: {', '.join(sorted(names))}." for reason, names in unavailable.items()]
    columns = ["workload", "optimizer", "step ×AdamW", "iteration ×AdamW", "iteration / bound", "goal"]
    return columns, rows, notes


def _convergence(figure: Figure) -> Summary:
    rows = []
    for task, record in figure["data"].items():
        adamw, shampoo = record["best"]["AdamW"], record["best"]["Shampoo"]
        steps = float(adamw["steps_to_target"]) / float(shampoo["steps_to_target"])
        seconds = float(adamw["seconds_to_target"]) / float(shampoo["seconds_to_target"])
        rows.append([task, record["target"], times(steps), times(seconds), adamw["lr"], shampoo["lr"],
                     f"{goal('steps', steps, convergence.STEPS_GOAL, at_most=False)}; "
                     f"{goal('wall-clock', seconds, convergence.WALL_CLOCK_GOAL, at_most=False)}"])
    notes = ["Best of each learning-rate sweep; ratios are AdamW over Shampoo (above 1: Shampoo needs less)."]
    if all("schedule" in record for record in figure["data"].values()):
        plans = [(task, record["schedule"]) for task, record in figure["data"].items()]
        steps = ", ".join(f"{task} {plan['warmup_steps']} of {plan['total_steps']}" for task, plan in plans)
        floors = {plan["final_fraction"] for _, plan in plans}
        notes.append(f"lr: the peak of the same schedule for both, linear warmup ({steps} steps) then cosine "
                     f"to {'/'.join(f'{floor:g}' for floor in sorted(floors))}× the peak at the last step.")
    columns = ["task", "target loss", "steps AdamW/Shampoo", "wall-clock AdamW/Shampoo", "best lr AdamW",
               "best lr Shampoo", "goal"]
    return columns, rows, notes


def _ablation(figure: Figure) -> Summary:
    table = figure["tables"][0]  # the best of each configuration's sweep: ablation.COLUMNS
    cell = {column: i for i, column in enumerate(table["columns"])}
    rows = []
    for row in table["rows"]:
        steps, seconds = row[cell["steps AdamW/this"]], row[cell["wall-clock AdamW/this"]]
        rows.append([row[cell["task"]], row[cell["configuration"]], row[cell["best lr"]],
                     None if steps is None else times(steps), None if seconds is None else times(seconds),
                     row[cell["status"]]])
    columns = ["task", "configuration", "best lr", "steps AdamW/this", "wall-clock AdamW/this", "status"]
    return columns, rows, [table["notes"][0]]


def _refresh_hiding(figure: Figure) -> Summary:
    data = figure["data"]
    rows = [[run["label"], run["median_ms"], run["mean_ms"], run["p99_ms"], times(run["p99_over_median"]),
             refresh_hiding.spread(run), times(run["refresh_step_over_median"]), run["wait_s"],
             refresh_hiding.goal_cell(run)]
            for run in data["runs"]]
    notes = [f"{data['workload']}; block_size {data['block_size']}, refresh every "
             f"{data['plan']['frequency']} steps, on {data['device']}; medians over {data['plan']['rounds']} "
             "rounds. The control refreshes at step 1 only: its p99/median is the machine's own noise."]
    if data["device"] == "cpu":
        notes.append("The paper's setting, training on a GPU and the roots on the host CPU "
                     "(`--device cuda`), is measured in the section \"On a GPU\" below.")
    columns = ["configuration", "median ms", "mean ms", "p99 ms", "p99/median", "p99/median per round",
               "refresh step / median", "blocked on roots s", "goal"]
    return columns, rows, notes


def _scaling(figure: Figure) -> Summary:
    data = figure["data"]
    rows = []
    for key, label, scale, target in scaling.ROWS:
        row = data["summary"][key]
        values = [scale * row[run] for run in scaling.RUNS]
        rows.append([label, *values, target.verdict(row) if target else ""])
    notes = [f"{data['config']['description']}; the most loaded rank. On two shared cores wall times also "
             "count waiting for a core, CPU times only the work."]
    return ["per rank", *scaling.RUNS, "goal"], rows, notes


def _inverse_root(figure: Figure) -> Summary:
    records = figure["data"]["accuracy"]
    largest = max(r["size"] for r in records)
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        times_at_largest = [r["time_s"] for r in mine if r["size"] == largest]
        rows.append([method, max(r["relative_error"] for r in mine), max(r["residual"] for r in mine),
                     f"{sum(r['accepted'] for r in mine)}/{len(mine)}", max(times_at_largest)])
    sizes = sorted({r["size"] for r in records})
    conditions = sorted({r["condition"] for r in records})
    notes = [f"(A + εI)^(-1/{figure['data']['exponent']}) of fp64 matrices of sizes {sizes[0]}–{sizes[-1]} "
             f"and condition numbers {conditions[0]:.0e}–{conditions[-1]:.0e}; worst case over all of them. "
             "No numeric goal."]
    columns = ["method", "worst relative error", "worst residual", "accepted", f"slowest s at size {largest}"]
    return columns, rows, notes


def _memory(figure: Figure) -> Summary:
    rows = []
    for workload, record in figure["data"].items():
        adamw = record["AdamW"]["bytes_per_param"]
        for label, entry in record.items():
            if label != "AdamW":
                versus_float32 = entry.get("versus_float32")
                rows.append([workload, label, entry["bytes_per_param"], adamw,
                             times(entry["bytes_per_param"] / adamw),
                             times(versus_float32) if versus_float32 else ""])
    notes = [f"Optimizer state after one step; fp32 except the bf16 rows. Goal: compact storage ≤"
             f"{memory.COMPACT_GOAL:g}× the default's bytes."]
    columns = ["workload", "optimizer", "bytes/param", "AdamW bytes/param", "×AdamW", "×float32 storage"]
    return columns, rows, notes


SUMMARIES: dict[str, Callable[[Figure], Summary]] = {
    step_time.NAME: _step_time,
    convergence.NAME: _convergence,
    ablation.NAME: _ablation,
    refresh_hiding.NAME: _refresh_hiding,
    scaling.NAME: _scaling,
    roots_bench.NAME: _inverse_root,
    memory.NAME: _memory,
}


def _measured(machine: dict[str, Any]) -> str:
    return (f"measured {machine['date'][:10]} in {machine['seconds']:.0f} s, {machine['torch_threads']} "
            f"torch threads, {machine['device']}, 1-min load {machine['load_average_1m']:.1f}→"
            f"{machine['load_average_1m_end']:.1f}")


def _machine_line(figures: list[Figure]) -> str:
    machines = [figure["machine"] for figure in figures if figure["status"] == "done"]
    if not machines:
        return "No figure measured yet."
    first = machines[0]
    dates = sorted(machine["date"][:10] for machine in machines)
    loads = [load for m in machines for load in (m["load_average_1m"], m["load_average_1m_end"])]
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    gpu = f", GPU {first['gpu']}" if "gpu" in first else ""
    return (f"Measured {span} on {first['platform']} ({first['processor']}, {first['cpu_count']} CPUs{gpu}), "
            f"torch {first['torch']}, Python {first['python']}, OMP_WAIT_POLICY "
            f"{first.get('omp_wait_policy', 'unset')}; 1-min load average {min(loads):.1f}–{max(loads):.1f} "
            "(other jobs share the machine).")


def _figure_lines(figure: Figure, link: str) -> list[str]:
    heading = f"**Figure {figure['number']}: {figure['title']}**"
    if figure["status"] != "done":
        return [heading, "", f"Not measured yet ({figure['status']}).", ""]
    plots = ", ".join(f"[{plot}]({link}/{plot})" for plot in figure["plots"])
    lines = [f"{heading} ({plots}; {_measured(figure['machine'])})", ""]
    summarize = SUMMARIES.get(figure["name"])
    if summarize is None:
        return [*lines, f"No summary: see [results.md]({link}/{report.MARKDOWN_NAME}).", ""]
    columns, rows, notes = summarize(figure)
    return [*lines, *report.render_rows(columns, rows), "", *(f"- {note}" for note in notes), ""]


def render(record: dict[str, Any], link: str) -> str:
    """The block between the markers for ``record``; ``link``: the results folder, relative to the README."""
    figures = record.get("figures", [])
    lines = [
        f"<!-- Generated by `python -m benchmarks.readme` from {link}/{report.JSON_NAME}: edit the "
        "generator, not this block. -->",
        "",
        _machine_line(figures),
        "",
        f"Every table in full, with the per-configuration numbers: [{report.MARKDOWN_NAME}]"
        f"({link}/{report.MARKDOWN_NAME}).",
        "",
    ]
    for figure in figures:
        lines += _figure_lines(figure, link)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} … {END} block")
    return f"{text[: start + len(BEGIN)]}\n{block}\n{text[end:]}"


def expected(readme: Path, results: Path) -> str:
    """``readme``'s text with its block rendered from ``results/results.json``."""
    link = Path(os.path.relpath(results.resolve(), readme.resolve().parent)).as_posix()
    return replace_block(readme.read_text(), render(report.load(results), link))


def update(readme: Path, results: Path) -> bool:
    """Regenerate ``readme``'s block from ``results``; whether the file changed."""
    text = expected(readme, results)
    if text == readme.read_text():
        return False
    readme.write_text(text)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README, help=f"default: {README}")
    parser.add_argument("--results", type=Path, default=report.RESULTS_DIR,
                        help=f"folder of results.json (default: {report.RESULTS_DIR})")
    args = parser.parse_args(argv)
    changed = update(args.readme, args.results)
    print(f"{args.readme}: {'regenerated' if changed else 'already up to date'}")


if __name__ == "__main__":
    main()
