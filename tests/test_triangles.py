"""Symmetric stacks as upper triangles: the round trip, the statistics and products on packed stacks
against the full ones."""

import pytest
import torch

from lightning_shampoo import triangles
from lightning_shampoo.kronecker import precondition, update_statistics


def _symmetric(n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    a = torch.randn(n, d, d, dtype=dtype)
    return a + a.mT


@pytest.mark.parametrize("d", [1, 2, 7, 16])
def test_pack_then_unpack_is_the_identity_on_symmetric_stacks(d: int) -> None:
    torch.manual_seed(d)
    stack = _symmetric(3, d)
    packed = triangles.pack(stack)
    assert packed.shape == (3, d * (d + 1) // 2) and triangles.is_packed(packed)
    assert torch.equal(triangles.unpack(packed), stack)
    assert torch.equal(triangles.full(packed), stack) and triangles.full(stack) is stack
    # Row by row, the entries on and above the diagonal.
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(packed, stack[:, rows, cols])


def test_a_count_that_is_no_triangle_is_refused() -> None:
    assert [triangles.side_of(triangles.size(d)) for d in range(40)] == list(range(40))
    with pytest.raises(ValueError, match="not the upper triangle"):
        triangles.side_of(5)


@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_packed_statistics_are_the_triangles_of_the_full_ones(beta2: float) -> None:
    torch.manual_seed(0)
    stack = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    full = [_symmetric(2, d) for d in (5, 4, 3)]
    packed = [triangles.pack(f) for f in full]
    for _ in range(3):
        update_statistics(full, stack, beta2)
        update_statistics(packed, stack, beta2)
    for f, p in zip(full, packed, strict=True):
        torch.testing.assert_close(triangles.unpack(p), f, rtol=1e-12, atol=1e-12)


def test_precondition_takes_packed_roots() -> None:
    torch.manual_seed(1)
    stack = torch.randn(2, 5, 4, dtype=torch.float64)
    roots = [_symmetric(2, 5), _symmetric(2, 4)]
    expected = precondition(stack, roots)
    torch.testing.assert_close(precondition(stack, [triangles.pack(r) for r in roots]), expected)
    torch.testing.assert_close(
        precondition(stack, [None, triangles.pack(roots[1])]), precondition(stack, [None, roots[1]])
    )
