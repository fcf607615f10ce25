import pytest
import torch

from lightning_shampoo.kronecker import precondition, update_statistics


def _unfold(block, dim):
    return block.movedim(dim, 0).reshape(block.shape[dim], -1)


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 5), (4, 6)])
@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_statistics_match_per_block_unfolding(shape, beta2):
    torch.manual_seed(0)
    stack = torch.randn(shape, dtype=torch.float64)
    factors = [torch.randn(shape[0], d, d, dtype=torch.float64) for d in shape[1:]]
    before = [f.clone() for f in factors]
    update_statistics(factors, stack, beta2)
    alpha = 1.0 if beta2 == 1.0 else 1 - beta2
    for dim, (factor, old) in enumerate(zip(factors, before)):
        for b in range(shape[0]):
            g = _unfold(stack[b], dim)
            torch.testing.assert_close(factor[b], beta2 * old[b] + alpha * g @ g.T)


def test_statistics_skip_identity_dims():
    stack = torch.randn(2, 3, 4)
    factor = torch.zeros(2, 4, 4)
    update_statistics([None, factor], stack, 0.5)
    torch.testing.assert_close(factor, 0.5 * torch.einsum("bij,bik->bjk", stack, stack))


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 5), (2, 7)])
def test_precondition_is_mode_products(shape):
    torch.manual_seed(1)
    stack = torch.randn(shape, dtype=torch.float64)
    roots = []
    for d in shape[1:]:
        a = torch.randn(shape[0], d, d, dtype=torch.float64)
        roots.append(a + a.mT)
    letters = "abcdefgh"[: len(shape) - 1]
    out = stack
    for dim, root in enumerate(roots):
        # Y[..., i, ...] = sum_j P[i, j] X[..., j, ...] on mode dim.
        src = "n" + letters
        dst = "n" + letters.replace(letters[dim], "z")
        out = torch.einsum(f"nz{letters[dim]},{src}->{dst}", root, out)
    result = precondition(stack, roots)
    torch.testing.assert_close(result, out)
    if len(shape) == 3:  # blocks of matrices: P₁ X P₂ᵀ without a transposed (copied-later) result
        assert result.is_contiguous()


def test_precondition_with_identity_dim():
    stack = torch.randn(2, 3, 4, dtype=torch.float64)
    root = torch.randn(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(precondition(stack, [None, root]), torch.einsum("bij,bkj->bik", stack, root))
