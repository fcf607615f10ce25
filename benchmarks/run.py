"""Entry point: ``python -m benchmarks.run [--quick] [--only NAME ...] [--threads N] [--out DIR]``.

Every figure is a function ``Settings -> FigureResult`` registered in :data:`FIGURES`, in the order of
the results file. Results are merged into ``OUT/results.json`` and ``OUT/results.md`` is re-rendered.
A run that is not ``--quick`` also regenerates the results block of ``--readme`` (by default the
repository's README.md when OUT is the default ``benchmarks/results``). A ``--quick`` run writes into the
scratch folder ``runs/benchmarks_quick`` (git-ignored) unless ``--out`` says otherwise: its numbers never
replace the committed results.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ablation, convergence, memory, readme, refresh_hiding, report, roots_bench, scaling, step_time
from .harness import FigureResult, Settings, machine_info, progress

DEFAULT_OUT = report.RESULTS_DIR
QUICK_OUT = report.RESULTS_DIR.parents[1] / "runs" / "benchmarks_quick"


@dataclass(frozen=True)
class Figure:
    name: str
    run: Callable[[Settings], FigureResult]


FIGURES: list[Figure] = [
    Figure(step_time.NAME, step_time.run),
    Figure(convergence.NAME, convergence.run),
    Figure(refresh_hiding.NAME, refresh_hiding.run),
    Figure(scaling.NAME, scaling.run),
    Figure(roots_bench.NAME, roots_bench.run),
    Figure(memory.NAME, memory.run),
    Figure(ablation.NAME, ablation.run),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [figure.name for figure in FIGURES]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this figure (repeatable): {', '.join(names)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads for every measurement (default: all CPUs)")
    parser.add_argument("--device", default="cpu", help="torch device for models and matrices (default: cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUT}; with --quick: {QUICK_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", type=Path, default=None,
                        help="README whose results block a run that is not --quick regenerates (default: "
                             f"{readme.README} when --out is the default folder, else none)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.readme is None and args.out.resolve() == DEFAULT_OUT:
        args.readme = readme.README
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(quick=args.quick, threads=args.threads, device=torch.device(args.device),
                        out_dir=args.out, seed=args.seed)
    machine = machine_info(settings)
    progress("run", f"torch {machine['torch']}, {args.threads} threads, {machine['cpu_count']} CPUs, "
                    f"device {settings.device}, load {machine['load_average_1m']:.2f}, quick={args.quick}")
    selected = [figure for figure in FIGURES if not args.only or figure.name in args.only]
    order = [figure.name for figure in FIGURES]
    markdown = args.out / report.MARKDOWN_NAME
    for figure in selected:
        start, at_start = time.perf_counter(), machine_info(settings)
        result = figure.run(settings)
        seconds = time.perf_counter() - start
        result.machine = {**at_start, "load_average_1m_end": os.getloadavg()[0], "seconds": seconds}
        # Written after every figure, so an interrupted run keeps what it measured.
        markdown = report.write(args.out, order, [result], machine)
        progress("run", f"{figure.name} done in {seconds:.1f} s; wrote {markdown}")
    # After every figure is on disk, so a failing summary costs no measurement. A quick run's numbers are a
    # smoke test, never the README's.
    if args.readme is not None and not args.quick and readme.update(args.readme, args.out):
        progress("run", f"regenerated the results block of {args.readme}")
    return markdown


if __name__ == "__main__":
    main()
