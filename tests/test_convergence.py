"""Convergence on a small real task: scikit-learn's bundled digits, each optimizer with its own lr sweep."""

import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_shampoo import Shampoo

STEPS = 100
SWEEP = (3e-3, 1e-2, 3e-2, 1e-1)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def _final_loss(make_optimizer, lr, digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    optimizer = make_optimizer(model.parameters(), lr)
    batches = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (256,), generator=batches)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _shampoo(params, lr):
    return Shampoo(params, lr=lr, precondition_frequency=10, start_preconditioning_step=5)


def test_shampoo_reaches_a_loss_adamw_does_not(digits):
    adamw = {lr: _final_loss(_adamw, lr, digits) for lr in SWEEP}
    shampoo = {lr: _final_loss(_shampoo, lr, digits) for lr in SWEEP}
    best_adamw, best_shampoo = min(adamw.values()), min(shampoo.values())
    print(f"full-data loss after {STEPS} steps: AdamW {adamw}, Shampoo {shampoo}")
    assert best_shampoo < 0.5 * best_adamw, (adamw, shampoo)


@pytest.mark.parametrize("preconditioner", ["root_inverse", "eigenvalue_corrected"])
def test_compact_storage_trains_like_float32(digits, preconditioner):
    """factor_dtype=bfloat16 (bfloat16 roots or bases; float32 factor triangles, bfloat16 factors for bases):
    at the better lr of the sweep's middle two, the final loss within 5% of float32 storage's. The root
    inverse with bfloat16 products (``matmul_dtype``) ends at 2.8-4.5x, and is warned about."""

    def make(**options):
        settings = dict(
            precondition_frequency=10, start_preconditioning_step=5, preconditioner=preconditioner
        )
        return lambda params, lr: Shampoo(params, lr=lr, **settings, **options)

    fp32 = min(_final_loss(make(), lr, digits) for lr in SWEEP[1:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compact storage alone is not warned about
        compact = min(_final_loss(make(factor_dtype=torch.bfloat16), lr, digits) for lr in SWEEP[1:3])
    assert compact <= 1.05 * fp32, (compact, fp32)
    if preconditioner == "root_inverse":
        with pytest.warns(UserWarning, match="matmul_dtype"):
            products = make(factor_dtype=torch.bfloat16, matmul_dtype=torch.bfloat16)
            low = min(_final_loss(products, lr, digits) for lr in SWEEP[1:3])
        assert low > 2 * fp32, (low, fp32)
