"""Figure 6: optimizer-state bytes per parameter, Shampoo vs AdamW, on the two timed models.

State is counted after one step (all state is created lazily by then), storage by storage, so views
and shared tensors are counted once. For a 2-D ``m×n`` block Shampoo keeps the first moment and the
graft's second moment (``8·m·n`` bytes, like AdamW) plus a factor and a root per dim
(``8·(m² + n²)`` bytes).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import optimizers, report
from .harness import FigureResult, Settings, Table, progress
from .models import WORKLOADS

NAME = "memory"


MOMENTS = ("exp_avg", "exp_avg_sq", "graft_sq")  # AdamW's and Shampoo's elementwise moments


def _category(key: str) -> str:
    """Breakdown of the state: moments, Kronecker factors, inverse roots, and the rest (step counters)."""
    if key in MOMENTS:
        return "moments"
    if key.startswith(("factor_", "root_")):
        return key.split("_")[0] + "s"
    return "other"


def state_bytes(optimizer: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per state key category, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = defaultdict(int)
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, Tensor):
                continue
            storage = value.untyped_storage()
            ident = (str(value.device), storage.data_ptr())
            if ident in seen:
                continue
            seen.add(ident)
            out[_category(key)] += storage.nbytes()
    return dict(out)


def run(settings: Settings) -> FigureResult:
    result = FigureResult(NAME, "Optimizer-state memory per parameter vs AdamW")
    table = Table(
        "Optimizer state after one step",
        ["workload", "optimizer", "params", "state MiB", "bytes/param", "× AdamW", "breakdown (bytes/param)"],
    )
    specs = [optimizers.adamw(), optimizers.shampoo(100)]
    bars: dict[str, dict[str, float]] = {}
    for make in WORKLOADS:
        workload = make(settings.quick, settings.device)
        batch = workload.batches(torch.Generator().manual_seed(settings.seed))[0]
        adamw_bytes = 0
        for spec in specs:
            torch.manual_seed(settings.seed)
            model = workload.build()
            assert spec.factory is not None
            optimizer = spec.factory(model.parameters())
            workload.loss(model, batch).backward()
            optimizer.step()
            optimizers.close(optimizer)
            breakdown = state_bytes(optimizer)
            total = sum(breakdown.values())
            adamw_bytes = adamw_bytes or total
            n_params = sum(p.numel() for p in model.parameters())
            per_param = {key: value / n_params for key, value in breakdown.items()}
            table.rows.append([
                workload.name, spec.label, n_params, total / 2**20, total / n_params, total / adamw_bytes,
                ", ".join(f"{key} {value:.2f}" for key, value in sorted(per_param.items())),
            ])
            bars[f"{workload.name}\n{spec.label}"] = per_param
            result.data.setdefault(workload.name, {})[spec.label] = {
                "params": n_params, "state_bytes": total, "bytes_per_param": total / n_params,
                "breakdown_bytes": breakdown,
            }
            progress(NAME, f"{workload.name} | {spec.label}: {total / n_params:.2f} bytes/param "
                           f"({total / 2**20:.2f} MiB)")
    table.notes += [
        "Shampoo at its defaults (block_size 1024, 1-D parameters preconditioned). moments: exp_avg and "
        "exp_avg_sq (AdamW) or graft_sq (Shampoo); factors and roots: the Kronecker statistics and their "
        "inverse roots; other: step counters. All fp32.",
        "No low-precision factor storage option exists yet; when one is added, add its spec here.",
    ]
    result.tables.append(table)
    result.plots.append(_plot(bars, settings))
    return result


def _plot(bars: dict[str, dict[str, float]], settings: Settings) -> str:
    fig, (ax,) = report.subplots(1, 1, width=7.0, height=4.0)
    categories = sorted({key for per in bars.values() for key in per})
    bottoms = [0.0] * len(bars)
    for category in categories:
        heights = [per.get(category, 0.0) for per in bars.values()]
        ax.bar(list(bars), heights, bottom=bottoms, label=category)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("optimizer-state bytes per parameter")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return report.save(fig, settings.out_dir, f"{NAME}.png")
