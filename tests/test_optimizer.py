"""Behaviour of the Shampoo optimizer beyond the update formulas (those are in test_reference_equivalence)."""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

from lightning_shampoo import Shampoo

FAST = dict(start_preconditioning_step=2, precondition_frequency=3)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bitwise_identical():
    batches = _batches(40)
    model = _model()
    opt = Shampoo(model.parameters(), lr=1e-2, **FAST)
    full = _train(model, opt, batches)

    first = _model()
    opt1 = Shampoo(first.parameters(), lr=1e-2, **FAST)
    _train(first, opt1, batches[:20])
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict()))

    second = _model(seed=123)
    second.load_state_dict(saved[0])
    opt2 = Shampoo(second.parameters(), lr=1e-2, **FAST)
    opt2.load_state_dict(saved[1])
    resumed = _train(second, opt2, batches[20:])
    assert resumed == full[20:]
    for a, b in zip(model.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_bf16_params_keep_fp32_state_through_a_checkpoint():
    model = _model(dtype=torch.bfloat16)
    opt = Shampoo(model.parameters(), lr=1e-2, **FAST)
    _train(model, opt, _batches(5))
    state = opt.state_dict()
    fresh = Shampoo(model.parameters(), lr=1e-2, **FAST)
    fresh.load_state_dict(state)
    weight = model[0].weight
    for key, value in opt.state[weight].items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float32, key
            assert fresh.state[weight][key].dtype == torch.float32, key
            assert torch.equal(fresh.state[weight][key], value), key


def test_same_seed_is_bitwise_reproducible():
    runs = []
    for _ in range(2):
        model = _model()
        runs.append(_train(model, Shampoo(model.parameters(), lr=1e-2, **FAST), _batches(12)))
    assert runs[0] == runs[1]


def test_nonfinite_gradient_is_skipped_counted_and_warned_once():
    model = _model()
    opt = Shampoo(model.parameters(), lr=1e-2, **FAST)
    _train(model, opt, _batches(4))
    weight = model[0].weight
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[weight].items()}
    weight_before = weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
            weight.grad[0, 0] = float("nan")
            opt.step()
    assert sum("non-finite gradient" in str(w.message) for w in caught) == 1
    assert opt.metrics()["nonfinite_skips"] == 3
    assert torch.equal(weight, weight_before)
    for key, value in before.items():
        # Roots may be refreshed meanwhile (from the untouched factors); everything else must not move.
        if isinstance(value, torch.Tensor) and not key.startswith("root_"):
            assert torch.equal(opt.state[weight][key], value), key
    assert opt.state[weight]["step"] == before["step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_screening_tells_unusable_gradients_from_large_usable_ones():
    from lightning_shampoo.guards import OVERFLOW_LIMIT, unusable_gradients

    big_fp16 = torch.full((10**6,), 100.0, dtype=torch.float16)  # its fp16 norm would overflow: still usable
    huge = torch.zeros(4, 4)
    huge[1, 2] = OVERFLOW_LIMIT**0.5 * 2  # finite, but its outer product would overflow fp32 statistics
    nan = torch.ones(3)
    nan[0] = float("nan")
    bad = unusable_gradients([big_fp16, huge, torch.empty(0), nan, torch.ones(5)])
    assert set(bad) == {1, 3}
    assert bad[1] == pytest.approx(float(huge[1, 2])) and bad[3] != bad[3]  # max|g| reported; NaN is NaN


def test_named_parameters_appear_in_the_warning():
    model = _model()
    opt = Shampoo(model.named_parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(RuntimeWarning, match=r"'0.weight'") as caught:
        opt.step()
    # Attributed to the line calling step(), not to torch's no-grad or profiling wrappers.
    assert caught[0].filename == __file__


def test_closure_grad_none_and_degenerate_params():
    scalar = nn.Parameter(torch.tensor(1.5))
    empty = nn.Parameter(torch.zeros(0, 3))
    unused = nn.Parameter(torch.ones(4, 4))
    vector = nn.Parameter(torch.ones(5))
    opt = Shampoo([scalar, empty, unused, vector], lr=0.1, **FAST)

    def closure():
        opt.zero_grad()
        loss = (scalar - 3.0) ** 2 + empty.sum() + (vector**2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(8)]
    assert losses[-1] < losses[0]
    assert torch.equal(unused, torch.ones(4, 4))
    assert unused not in opt.state or not opt.state[unused]


def test_sparse_and_complex_gradients_are_refused_by_name():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Shampoo(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse.*'weight'"):
        opt.step()
    z = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(TypeError, match="complex"):
        Shampoo([z]).step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"betas": (0.9, 0.0)}, "betas"),
        ({"graft": "lion"}, "graft"),
        ({"inverse_root": "svd"}, "inverse_root"),
        ({"block_size": 0}, "block_size"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
        ({"exponent_override": 0}, "exponent_override"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"eigh_dtype": torch.float16}, "eigh_dtype must be None or one of"),
    ],
)
def test_invalid_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shampoo([nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_mismatched_checkpoint_is_refused_before_loading():
    model = _model()
    opt = Shampoo(model.parameters(), block_size=4, **FAST)
    _train(model, opt, _batches(3))
    other = Shampoo(model.parameters(), block_size=8, **FAST)
    with pytest.raises(ValueError, match="block_size"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_rejected_roots_keep_the_previous_root():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    opt = Shampoo(
        [w], block_size=5, start_preconditioning_step=1, precondition_frequency=1, inverse_root="newton"
    )
    w.grad = torch.randn(5, 4)
    opt.step()
    root_before = opt.state[w]["root_0_0"].clone()
    assert opt.metrics()["roots_accepted"] == 2
    # A NaN in the statistics makes every later root fail its checks: the installed root must survive.
    opt.state[w]["factor_0_0"][0, 0, 0] = float("nan")
    w.grad = torch.randn(5, 4)
    opt.step()
    assert opt.metrics()["roots_rejected"] >= 1
    assert torch.equal(opt.state[w]["root_0_0"], root_before)
    assert torch.isfinite(w).all()


def test_a_rejected_block_keeps_its_root_while_its_stack_mates_update():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 4))  # two 5×4 blocks: factor_0_0 stacks two 5×5 matrices
    classic = dict(exponent_multiplier=1)  # the root checked below is the classic (S + εI)^(-1/4)
    opt = Shampoo([w], block_size=5, start_preconditioning_step=1, precondition_frequency=1, **classic)
    w.grad = torch.randn(10, 4)
    opt.step()
    root_before = opt.state[w]["root_0_0"].clone()
    opt.state[w]["factor_0_0"][1, 0, 0] = float("nan")
    w.grad = torch.randn(10, 4)
    opt.step()
    root_after = opt.state[w]["root_0_0"]
    assert opt.metrics()["roots_rejected"] == 1
    assert torch.equal(root_after[1], root_before[1])
    assert not torch.equal(root_after[0], root_before[0])
    # The accepted block holds the root of its own statistics (the ridge is relative: ε·λ_max).
    factor = opt.state[w]["factor_0_0"][0].double()
    eigenvalues, vectors = torch.linalg.eigh(factor)
    shifted = eigenvalues.clamp_min(0) + 1e-6 * eigenvalues.max()  # the default epsilon, relative
    expected = vectors @ torch.diag(shifted.pow(-0.25)) @ vectors.T
    torch.testing.assert_close(root_after[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_factors_are_fp32_for_half_params():
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float16))
    opt = Shampoo([w], **FAST)
    for _ in range(3):
        w.grad = torch.randn(4, 3, dtype=torch.float16)
        opt.step()
    assert opt.state[w]["factor_0_0"].dtype == torch.float32
    assert w.dtype == torch.float16 and torch.isfinite(w).all()


def test_statistics_every_k_steps():
    w = nn.Parameter(torch.zeros(3, 2))
    beta2 = 0.999
    opt = Shampoo([w], block_size=3, statistics_frequency=2, start_preconditioning_step=100, betas=(0, beta2))
    grads = [torch.randn(3, 2) for _ in range(4)]
    for g in grads:
        w.grad = g
        opt.step()
    expected = (1 - beta2) * grads[1] @ grads[1].T
    expected = beta2 * expected + (1 - beta2) * grads[3] @ grads[3].T
    torch.testing.assert_close(opt.state[w]["factor_0_0"][0], expected)


def test_param_groups_are_batched_apart_and_keep_their_own_hyperparameters():
    # One optimizer over two groups steps every parameter exactly like one optimizer per group: the
    # batched (foreach) phases never mix one group's lr, betas, graft or weight decay into another's.
    groups = [
        dict(lr=0.1, weight_decay=0.1, betas=(0.9, 0.95), graft="adam", epsilon=1e-4),
        dict(lr=0.05, betas=(0.5, 0.99), graft="rmsprop", graft_beta2=0.9, graft_epsilon=1e-3),
    ]
    shapes = [[(6, 5), (5,)], [(4, 3, 2), (7,), (8, 2)]]

    def build() -> list[list[nn.Parameter]]:
        torch.manual_seed(0)
        return [[nn.Parameter(torch.randn(shape)) for shape in group] for group in shapes]

    together, apart = build(), build()
    pairs = list(zip(itertools.chain(*together), itertools.chain(*apart), strict=True))
    joint = Shampoo([{"params": ps, **options} for ps, options in zip(together, groups, strict=True)], **FAST)
    single = [Shampoo(ps, **options, **FAST) for ps, options in zip(apart, groups, strict=True)]
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        for a, b in pairs:
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        if step == 3:  # a skipped parameter in the middle of a group
            together[1][1].grad[0] = apart[1][1].grad[0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            joint.step()
            for optimizer in single:
                optimizer.step()
    for a, b in pairs:
        assert torch.equal(a, b)
    assert joint.state[together[1][1]]["step"] == 6 and joint.state[together[1][0]]["step"] == 7


def test_compact_storage_keeps_float32_factor_triangles_and_bfloat16_roots():
    """factor_dtype=bfloat16: roots as bfloat16 triangles beside float32 factor triangles (bfloat16 factors
    would drown their small eigenvalues); bases are not symmetric, so they and their factors stay full."""
    layer = nn.Linear(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compact = Shampoo(layer.parameters(), factor_dtype=torch.bfloat16, start_preconditioning_step=1)
        corrected = Shampoo(
            layer.parameters(), factor_dtype=torch.bfloat16, preconditioner="eigenvalue_corrected"
        )
    layer(torch.randn(8, 6)).square().sum().backward()
    compact.step()
    corrected.step()
    state = compact.state[layer.weight]
    assert (state["factor_0_0"].shape, state["factor_0_0"].dtype) == ((1, 10), torch.float32)
    assert (state["root_0_0"].shape, state["root_0_0"].dtype) == ((1, 10), torch.bfloat16)
    assert compact.metrics()["roots_accepted"] == 3  # weight (two) and bias, from the packed factors
    state = corrected.state[layer.weight]
    assert state["factor_0_0"].shape == state["basis_0_0"].shape == (1, 4, 4)
    assert state["factor_0_0"].dtype == state["basis_0_0"].dtype == torch.bfloat16


def test_bfloat16_products_with_roots_are_warned_about_and_with_bases_are_not():
    params = nn.Linear(4, 3).parameters
    with pytest.warns(UserWarning, match="matmul_dtype=None") as caught:
        Shampoo(params(), matmul_dtype=torch.bfloat16)
    assert caught[0].filename == __file__  # the user's line, not the package's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Shampoo(params(), matmul_dtype=torch.bfloat16, preconditioner="eigenvalue_corrected")
        Shampoo(params(), factor_dtype=torch.bfloat16)


def test_a_checkpoint_of_the_other_storage_is_refused_with_the_factor_dtype_that_loads_it():
    def trained(dtype):
        layer = nn.Linear(6, 4)
        opt = Shampoo(layer.parameters(), factor_dtype=dtype, start_preconditioning_step=1)
        layer(torch.randn(8, 6)).square().sum().backward()
        opt.step()
        return layer, opt

    _, compact = trained(torch.bfloat16)
    layer, full = trained(torch.float32)
    before = {k: v.clone() for k, v in full.state[layer.weight].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"as triangles .* factor_dtype=torch\.bfloat16 to resume"):
        full.load_state_dict(compact.state_dict())
    assert all(torch.equal(full.state[layer.weight][k], v) for k, v in before.items())  # unchanged
    with pytest.raises(ValueError, match=r"full matrices .* factor_dtype=torch\.float32 to resume"):
        compact.load_state_dict(full.state_dict())
    _, other = trained(torch.float32)
    other.load_state_dict(full.state_dict())  # the storage it names loads it
