"""Ownership by block without processes: the assignment (whole parameters as before, large ones cut into
contiguous ranges that balance the ranks), a rank's part of a parameter, and the conversions between the
ranks' parts and the complete (one-process) state, bit for bit."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lightning_shampoo.blocking import plan_blocks
from lightning_shampoo.cost import Work, block_costs, parameter_cost, parameter_work
from lightning_shampoo.partition import SPLIT_MIN_FLOPS, PartPlan, Split, assign, assign_owners, segments


def _work(costs: list[list[float]]) -> list[Work]:
    """Parameters with the given block costs (the plan is irrelevant to the assignment)."""
    plan = plan_blocks((4,), 8)
    return [Work(plan, sum(blocks), tuple(blocks)) for blocks in costs]


def _loads(ranges, work: list[Work], world_size: int) -> list[float]:
    loads = [0.0] * world_size
    for param, owned in zip(work, ranges):
        for rank, first, end in owned:
            loads[rank] += sum(param.blocks[first:end])
    return loads


@pytest.mark.parametrize(
    ("shape", "block_size", "preconditioner"),
    [((12, 6), 8, "root_inverse"), ((20, 3, 3), 4, "eigenvalue_corrected"), ((30,), 8, "root_inverse"),
     ((5, 7), 100, "root_inverse"), ((1000, 300), 128, "eigenvalue_corrected")],
)  # fmt: skip
def test_block_costs_add_up_to_the_parameter_cost_in_block_order(shape, block_size, preconditioner) -> None:
    plan = plan_blocks(shape, block_size)
    costs = block_costs(plan, 7, preconditioner)
    assert sum(costs) == pytest.approx(parameter_cost(plan, 7, preconditioner), rel=1e-12)
    # Block order: group by group, as plan.split stacks them.
    assert len(costs) == sum(group.n_blocks for group in plan.groups)
    sizes = [math.prod(group.block_shape) for group in plan.groups for _ in range(group.n_blocks)]
    assert [a < b for a, b in itertools.pairwise(costs)] == [a < b for a, b in itertools.pairwise(sizes)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_parameters_within_their_fair_share_are_owned_whole_as_before(world_size: int) -> None:
    rng = random.Random(world_size)
    for _ in range(20):
        costs = [[rng.uniform(1, 10) * SPLIT_MIN_FLOPS] * rng.randint(1, 4) for _ in range(3 * world_size)]
        work = _work(costs)
        if max(w.total for w in work) > sum(w.total for w in work) / world_size:
            continue
        ranges, loads = assign(work, world_size)
        owners, expected_loads = assign_owners([w.total for w in work], world_size)
        assert ranges == tuple(((owner, 0, len(w.blocks)),) for owner, w in zip(owners, work))
        assert loads == expected_loads


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_a_dominant_parameter_is_cut_into_contiguous_ranges_that_balance_the_ranks(world_size: int) -> None:
    rng = random.Random(world_size)
    for _ in range(20):
        block = SPLIT_MIN_FLOPS
        small = [[rng.uniform(0.5, 3) * block] * rng.randint(1, 4) for _ in range(rng.randint(0, 6))]
        count = rng.randint(4 * world_size, 40 * world_size)
        large = [rng.choice([block, 0.5 * block]) for _ in range(count)]
        work = _work([*small[:2], large, *small[2:]])
        dominant = len(small[:2])
        ranges, loads = assign(work, world_size)
        assert ranges == assign(list(work), world_size)[0]  # deterministic
        total = sum(w.total for w in work)
        assert list(loads) == pytest.approx(_loads(ranges, work, world_size))
        # Water filling: the most loaded rank within a block (or a whole parameter) of the ideal.
        bound = total / world_size + max([block, *(w.total for i, w in enumerate(work) if i != dominant)])
        assert max(loads) <= bound + 1e-6 * total
        for owned, w in zip(ranges, work):
            # Contiguous ranges in block order covering every block once, one range per rank.
            assert [first for _, first, _ in owned] == [0, *(end for _, _, end in owned[:-1])]
            assert owned[-1][2] == len(w.blocks) and all(first < end for _, first, end in owned)
            assert len({rank for rank, _, _ in owned}) == len(owned)
        if work[dominant].total > bound:
            assert len(ranges[dominant]) > 1  # too large for any one rank: split


def test_small_parameters_are_never_split() -> None:
    work = _work([[SPLIT_MIN_FLOPS / 100] * 20, [1.0], [1.0]])
    ranges, _ = assign(work, 4)
    assert all(len(owned) == 1 for owned in ranges)


def test_assignment_continues_from_earlier_loads() -> None:
    work = _work([[SPLIT_MIN_FLOPS] * 8])
    ranges, loads = assign(work, 2, loads=[6 * SPLIT_MIN_FLOPS, 0.0])
    # The fair level is 7 blocks: rank 0 (6 already) takes one, rank 1 seven.
    assert ranges == (((0, 0, 1), (1, 1, 8)),)
    assert loads == (7 * SPLIT_MIN_FLOPS, 7 * SPLIT_MIN_FLOPS)


def test_segments_follow_the_block_groups() -> None:
    plan = plan_blocks((20, 12), 8)  # groups of 8×8, 8×4, 4×8 and 4×4 blocks
    sizes = [group.n_blocks for group in plan.groups]
    first, end = 1, sum(sizes) - 1
    parts = segments(plan, first, end)
    assert sum(stop - start for _, start, stop in parts) == end - first
    assert [g for g, _, _ in parts] == sorted({g for g, _, _ in parts})


PLANS = [((20, 12), 8), ((64, 96), 32), ((6, 10, 9), 4), ((40,), 8), ((33, 17), 16)]


def _split(plan, world_size: int) -> Split:
    n = sum(group.n_blocks for group in plan.groups)
    cuts = sorted({0, n, *(n * k // world_size for k in range(1, world_size))})
    return Split.of(plan, [(rank, a, b) for rank, (a, b) in enumerate(itertools.pairwise(cuts))])


@pytest.mark.parametrize(("shape", "block_size"), PLANS)
def test_the_parts_of_a_tensor_reassemble_it_bit_for_bit(shape, block_size) -> None:
    plan = plan_blocks(shape, block_size)
    split = _split(plan, 3)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    parts = {rank: part.take(tensor) for rank, part in split.parts.items()}
    assert sum(part.numel() for part in parts.values()) == tensor.numel()
    assert torch.equal(split.assemble(parts), tensor)
    whole_stacks = plan.split(tensor)
    for part, flat in zip(split.parts.values(), parts.values()):
        stacks = part.split(flat)
        assert torch.equal(part.merge(stacks), flat)
        for (g, start, stop), stack in zip(part.segments, stacks):
            assert torch.equal(stack, whole_stacks[g][start:stop])
            assert stack.data_ptr() >= flat.data_ptr()  # a view of the flat part


@pytest.mark.parametrize(("shape", "block_size"), PLANS)
def test_state_cut_into_parts_joins_back_to_the_complete_state(shape, block_size) -> None:
    plan = plan_blocks(shape, block_size)
    split = _split(plan, 3)
    g = torch.Generator().manual_seed(1)
    state = {"step": 7, "exp_avg": torch.randn(shape, generator=g)}
    state["graft_sq"] = torch.rand(shape, generator=g)
    for index, group in enumerate(plan.groups):
        for dim, size in enumerate(group.block_shape):
            state[f"factor_{index}_{dim}"] = torch.randn(group.n_blocks, size, size, generator=g)
            state[f"root_{index}_{dim}"] = torch.randn(group.n_blocks, size, size, generator=g)
    state["preconditioned"] = False
    parts = {rank: split.cut_state(rank, state) for rank in split.parts}
    for rank, part in parts.items():
        plan_part = split.parts[rank]
        assert part["exp_avg"].shape == (plan_part.param_shape[0],)
        expected = {f"factor_{i}_{d}" for i, group in enumerate(plan_part.groups) for d in range(group.order)}
        assert {k for k in part if k.startswith("factor_")} == expected
    parts[1] = {**parts[1], "preconditioned": True}  # a flag any part raised is raised
    joined = split.join_states(parts)
    assert joined.keys() == state.keys() and joined["preconditioned"] is True and joined["step"] == 7
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(joined[key], value), key


def test_refreshes_in_flight_cut_into_parts_join_back() -> None:
    plan = plan_blocks((64, 96), 32)  # one group of 2×3 blocks of 32×32
    split = _split(plan, 4)
    g = torch.Generator().manual_seed(2)
    entries = [
        {
            "step": 5,
            "install_step": 6,
            "snapshot": {"param_index": 3, "name": f"0_{dim}", "request": {"kind": "basis"},
                         "matrices": torch.randn(6, 32, 32, generator=g),
                         "previous": torch.randn(6, 32, 32, generator=g)},
            "result": {"kind": "basis", "basis": torch.randn(6, 32, 32, generator=g),
                       "residual": torch.rand(6), "accepted": torch.rand(6) > 0.3,
                       "full": torch.rand(6) > 0.5, "kept": torch.rand(6) > 0.5},
        }
        for dim in range(2)
    ]  # fmt: skip
    parts = {rank: [e for entry in entries for e in split.cut_entry(rank, entry)] for rank in split.parts}
    assert all(e["snapshot"]["matrices"].shape[0] < 6 for items in parts.values() for e in items)
    joined = split.join_entries(parts)
    assert [e["snapshot"]["name"] for e in joined] == ["0_0", "0_1"]
    for got, expected in zip(joined, entries):
        assert got["snapshot"]["request"] == expected["snapshot"]["request"]
        for section in ("snapshot", "result"):
            for key, value in expected[section].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[section][key], value), (section, key)
    # A part without its result: the joined refresh is recomputed (no result), never half-installed.
    parts[0] = [{**e, "result": None} for e in parts[0]]
    assert all(e["result"] is None for e in split.join_entries(parts))


def test_the_split_threshold_keeps_small_models_whole() -> None:
    # The distributed tests' MLP (Linear(6, 12), Linear(12, 12), Linear(12, 3), block_size 8): today's
    # owners, whatever its largest matrix's share.
    shapes = [(12, 6), (12,), (12, 12), (12,), (3, 12), (3,)]
    work = [parameter_work(plan_blocks(shape, 8), 3) for shape in shapes]
    assert all(w.total < SPLIT_MIN_FLOPS for w in work)
    ranges, _ = assign(work, 2)
    assert all(len(owned) == 1 for owned in ranges)


def test_a_part_plan_is_a_block_plan_of_its_segments() -> None:
    plan = plan_blocks((64, 96), 32)
    part = PartPlan.of(plan, [(0, 2, 5)])
    assert part.param_shape == (3 * 32 * 32,) and part.preconditioned
    assert [group.n_blocks for group in part.groups] == [3]
    assert part.groups[0].block_shape == (32, 32) and part.groups[0].order == 2
