import itertools

import pytest
import torch

from lightning_shampoo.blocking import merge_small_dims, plan_blocks


def _reference_cells(shape, block_size):
    """Grid cells as index slices, from the rules written out: every dim cut into block_size chunks."""
    ranges = [[slice(s, min(s + block_size, size)) for s in range(0, size, block_size)] for size in shape]
    return list(itertools.product(*ranges))


@pytest.mark.parametrize(
    ("shape", "block_size", "merged"),
    [
        ((3, 1, 4, 5), 20, (12, 5)),
        ((64, 3, 3, 3), 128, (64, 27)),
        ((1, 1), 8, ()),
        ((2, 2, 2, 2), 4, (4, 4)),
        ((2, 2, 2, 2), 16, (16,)),
        ((7, 300, 2), 64, (7, 300, 2)),
    ],
)
def test_merge_small_dims(shape, block_size, merged):
    assert merge_small_dims(shape, block_size) == merged


@pytest.mark.parametrize(
    ("shape", "block_size"),
    [
        ((10, 7), 4),
        ((8, 8), 4),
        ((9,), 4),
        ((10, 7, 5), 3),
        ((3, 1, 4, 5), 20),
        ((5, 6), 100),
        ((13, 2, 9), 4),
    ],
)
def test_split_matches_reference_cells_and_merge_inverts(shape, block_size):
    x = torch.randn(shape)
    plan = plan_blocks(shape, block_size)
    merged = x.reshape(plan.merged_shape)
    expected = sorted(
        (tuple(merged[cell].shape), merged[cell].flatten().tolist())
        for cell in _reference_cells(merged.shape, block_size)
    )
    got = sorted((tuple(block.shape), block.flatten().tolist()) for stack in plan.split(x) for block in stack)
    assert got == expected
    assert torch.equal(plan.merge(plan.split(x)), x)


def test_whole_tensor_block_is_a_view():
    x = torch.randn(6, 5)
    plan = plan_blocks(x.shape, 8)
    (stack,) = plan.split(x)
    assert stack.shape == (1, 6, 5)
    assert stack.data_ptr() == x.data_ptr()


def test_large_dims_left_unpreconditioned_and_unsplit():
    plan = plan_blocks((1000, 6), 4, max_preconditioned_dim=100)
    assert {g.block_shape for g in plan.groups} == {(1000, 4), (1000, 2)}
    assert all(g.preconditioned == (False, True) for g in plan.groups)
    assert all(g.order == 1 for g in plan.groups)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((), {}),
        ((1, 1), {}),
        ((0, 3), {}),
        ((7,), {"precondition_1d": False}),
        ((500,), {"max_preconditioned_dim": 10}),
    ],
)
def test_graft_only_parameters_have_no_blocks(shape, kwargs):
    assert not plan_blocks(shape, 4, **kwargs).preconditioned


def test_one_dimensional_gets_one_factor():
    plan = plan_blocks((7,), 4)
    assert [g.block_shape for g in plan.groups] == [(4,), (3,)]
    assert all(g.order == 1 for g in plan.groups)
