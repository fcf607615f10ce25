"""Figure 6: optimizer-state bytes per parameter, Shampoo configurations vs AdamW, on the timed models,
the recipes' models and the README's examples.

State is counted after one step (all state is created lazily by then), storage by storage, so views
and shared tensors are counted once. For a 2-D ``m×n`` block Shampoo keeps the first moment and the
graft's second moment (``8·m·n`` bytes, like AdamW) plus a factor and a root per dim (``8·(m² + n²)``
bytes in fp32; compact storage, ``factor_dtype=torch.bfloat16``, keeps their upper triangles, the
factors in fp32 and the roots in bf16: ``3·(m² + n²)`` and a little); a dim whose factor would be far
larger than its block has none (``max_factor_ratio``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_shampoo.recipes import CharTransformer, DigitsMLP

from . import optimizers, report
from .harness import FigureResult, Settings, Table, goal_verdict, progress
from .models import WORKLOADS, mlp

NAME = "memory"


MOMENTS = ("exp_avg", "exp_avg_sq", "graft_sq")  # AdamW's and Shampoo's elementwise moments


def _category(key: str) -> str:
    """Breakdown of the state: moments, Kronecker factors, inverse roots or eigenbases, and the rest."""
    if key in MOMENTS:
        return "moments"
    if key.startswith(("factor_", "root_")):
        return key.split("_")[0] + "s"
    if key.startswith("basis_"):
        return "bases"
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


@dataclass(frozen=True)
class Model:
    """A model whose optimizer state is counted, and an input that trains it one step."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], torch.Tensor]


def models(quick: bool, device: torch.device) -> list[Model]:
    """The timed workloads' models, the recipes' models at their defaults and the README's examples."""
    timed = [Model(w.name, w.build, lambda w=w: w.batches(torch.Generator().manual_seed(0))[0][0])
             for w in (make(quick, device) for make in WORKLOADS)]
    tokens = lambda: torch.randint(0, 256, (2, 128), device=device)  # noqa: E731
    features = lambda width: (lambda: torch.randn(8, width, device=device))  # noqa: E731
    return [
        *timed,
        Model("digits recipe (DigitsMLP)", lambda: DigitsMLP().to(device), features(64)),
        Model("char-LM recipe (CharTransformer)", lambda: CharTransformer().to(device), tokens),
        Model("README PyTorch example", lambda: mlp((32, 64, 1)).to(device), features(32)),
        Model("README Accelerate example", lambda: torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device), features(32)),
    ]


# Each bfloat16 configuration against its float32 twin; issue 12's goal: compact storage at most
# COMPACT_GOAL of the default's bytes.
COMPACT = "Shampoo compact (bf16)"
FLOAT32_TWINS = {COMPACT: "Shampoo f10", "Shampoo EC bf16": "Shampoo EC"}
COMPACT_GOAL = 0.6


def configurations() -> list[optimizers.OptimizerSpec]:
    """AdamW, Shampoo at its defaults, with compact (bfloat16) storage, with every dim a factor (the earlier
    default) and eigenvalue corrected, in fp32 and bf16 storage."""
    return [
        optimizers.adamw(),
        optimizers.shampoo(10),
        optimizers.shampoo(10, factor_dtype=torch.bfloat16, label=COMPACT),
        optimizers.shampoo(10, max_factor_ratio=None, label="Shampoo, every dim a factor"),
        optimizers.shampoo(10, preconditioner="eigenvalue_corrected", graft="none", label="Shampoo EC"),
        optimizers.shampoo(
            10, preconditioner="eigenvalue_corrected", graft="none", factor_dtype=torch.bfloat16,
            label="Shampoo EC bf16",
        ),
    ]


def run(settings: Settings) -> FigureResult:
    result = FigureResult(NAME, "Optimizer-state memory per parameter vs AdamW")
    table = Table(
        "Optimizer state after one step",
        ["model", "optimizer", "params", "state MiB", "bytes/param", "× AdamW", "× float32 storage",
         f"goal ≤{COMPACT_GOAL:g}× (compact)", "breakdown (bytes/param)"],
    )
    bars: dict[str, dict[str, float]] = {}
    for model_entry in models(settings.quick, settings.device):
        adamw_bytes = 0
        totals: dict[str, int] = {}
        for spec in configurations():
            torch.manual_seed(settings.seed)
            model = model_entry.build()
            assert spec.factory is not None
            optimizer = spec.factory(model.parameters())
            model(model_entry.inputs()).float().square().mean().backward()
            optimizer.step()
            optimizers.close(optimizer)
            breakdown = state_bytes(optimizer)
            total = sum(breakdown.values())
            adamw_bytes = adamw_bytes or total
            totals[spec.label] = total
            twin = totals.get(FLOAT32_TWINS.get(spec.label, ""))
            versus_float32 = total / twin if twin else None
            verdict = ""
            if spec.label == COMPACT and versus_float32 is not None:
                verdict = goal_verdict(versus_float32, COMPACT_GOAL, at_most=True)
            n_params = sum(p.numel() for p in model.parameters())
            per_param = {key: value / n_params for key, value in breakdown.items()}
            table.rows.append([
                model_entry.name, spec.label, n_params, total / 2**20, total / n_params, total / adamw_bytes,
                versus_float32, verdict,
                ", ".join(f"{key} {value:.2f}" for key, value in sorted(per_param.items())),
            ])
            if model_entry.name in ("mlp", "lm"):
                bars[f"{model_entry.name}\n{spec.label}"] = per_param
            result.data.setdefault(model_entry.name, {})[spec.label] = {
                "params": n_params, "state_bytes": total, "bytes_per_param": total / n_params,
                "breakdown_bytes": breakdown, "versus_float32": versus_float32,
            }
            progress(NAME, f"{model_entry.name} | {spec.label}: {total / n_params:.2f} bytes/param "
                           f"({total / 2**20:.2f} MiB)")
    table.notes += [
        "Shampoo at its defaults (refresh every 10 steps, block_size 1024, max_factor_ratio 16: vectors and "
        "dims far larger than their block keep the diagonal method). moments: exp_avg and exp_avg_sq "
        "(AdamW, eigenvalue corrected) or graft_sq; factors, roots, bases: the Kronecker statistics and "
        "their inverse roots or eigenbases; other: step counters and the refresh slots of the saved form.",
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
