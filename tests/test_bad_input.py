"""Bad input gives a clear error; samples whose f turns NaN/Inf fail alone, loudly but without an exception.

Errors: the exception type (TypeError for a wrong type, ValueError for a wrong value) and a message that
names the argument and what came (and, for a choice, lists the valid ones), for deqfast.fixed_point,
deqfast.DEQ and the three solvers. Over 40 kinds of bad input: what f returns (shape, dtype, device,
not a tensor, written into z, under inference mode too, not depending on z), f/cell/x, z0 (not a
tensor, not floating, 0-dim, float8, sparse COO/CSR, meta, inside vmap/grad), every choice, unknown
keywords, every numeric keyword out of range or of the wrong type, compat's get_deq arguments.

Failing samples: f(z) = where(bad, NaN or a diverging value, good cell) must give exactly one
RuntimeWarning that counts the failed samples, stats.failed / stats.converged that mark them, a finite
returned iterate for them, and, for every other sample, a result bit-identical to solving the good
samples alone (every decision is per sample). The good cell below is batch-invariant on purpose
(a broadcast multiply-and-sum rather than a GEMM, whose rounding can depend on the batch size), so
bit-identity is a property of deqfast alone.
"""
import re
import warnings

import pytest
import torch

import deqfast
from deqfast import solvers

B, D = 4, 3

SOLVER_FUNCS = {
    "anderson": solvers.anderson,
    "fixed_point_iteration": solvers.fixed_point_iteration,
    "broyden": solvers.broyden,
}


def _z0(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype)


def _contraction(z):
    return 0.5 * z + 1.0


def _call_deq(f, z0, **kw):
    """deqfast.DEQ with a cell (z, x) -> f(z); x is z0 (unused by f), z0 passed explicitly."""
    layer = deqfast.DEQ(lambda z, x: f(z), **kw)
    return layer(z0, z0=z0)


ENTRIES = {
    "fixed_point": lambda f, z0, **kw: deqfast.fixed_point(f, z0, **kw),
    "DEQ": _call_deq,
    "anderson": lambda f, z0, **kw: solvers.anderson(f, z0, **kw),
    "fixed_point_iteration": lambda f, z0, **kw: solvers.fixed_point_iteration(f, z0, **kw),
    "broyden": lambda f, z0, **kw: solvers.broyden(f, z0, **kw),
}
ALL = list(ENTRIES)
FULL = ["fixed_point", "DEQ"]  # take every keyword of the public API

# The keywords each solver takes (DESIGN.md: deqfast.solvers.* take the solver keywords).
SOLVER_KEYWORDS = {
    "anderson": {"max_iter", "tol", "stop_mode", "m", "lam", "tau", "check_every"},
    "fixed_point_iteration": {"max_iter", "tol", "stop_mode", "tau", "check_every"},
    "broyden": {"max_iter", "tol", "stop_mode", "m", "check_every"},
}


def _entries_taking(keyword):
    return FULL + [name for name, kws in SOLVER_KEYWORDS.items() if keyword in kws]


def _value_pattern(value):
    """The value as the message shows it, not mistaken for a digit of a range such as "(0, 1]"."""
    return re.escape(str(value)) + r"(?![,\d])"


# ---------------------------------------------------------------------------------------------
# What f returns
# ---------------------------------------------------------------------------------------------

F_NAMED = r"(\bf\b|\bcell\b)"  # DEQ's callable is its cell; the others call it f


@pytest.mark.parametrize("entry", ALL)
def test_f_returns_other_shape(entry):
    with pytest.raises(ValueError, match=F_NAMED + r".*shape.*\(4, 3\).*\(4, 2\)"):
        ENTRIES[entry](lambda z: z[:, :2] * 0.5, _z0())


@pytest.mark.parametrize("entry", ALL)
def test_f_returns_other_dtype(entry):
    with pytest.raises(TypeError, match=F_NAMED + r".*dtype.*float32.*float64"):
        ENTRIES[entry](lambda z: 0.5 * z.double(), _z0())


@pytest.mark.parametrize("mode", ["grad", "inference"])
@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("shape", [(B, D), (B, 1, D)], ids=["flat", "3d"])
def test_f_writing_into_its_argument_is_an_error(entry, shape, mode):
    """An in-place op on z (relu_, ReLU(inplace=True)) would change the solver's iterate under it;
    under torch.inference_mode too, where z has no version counter of its own."""
    with pytest.raises(RuntimeError, match=F_NAMED + r".*modified its argument z in place"):
        with torch.inference_mode(mode == "inference"):
            ENTRIES[entry](lambda z: 0.5 * torch.relu_(z) + 1.0, _z0().reshape(shape))


@pytest.mark.parametrize("entry", ALL)
def test_every_entry_runs_under_inference_mode(entry):
    """Inference tensors keep no version counter: the in-place check must not need one."""
    with torch.inference_mode():
        out = ENTRIES[entry](_contraction, _z0(), tol=1e-6)
    z = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(z, torch.full((B, D), 2.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("entry", ALL)
def test_f_returns_other_device(entry):
    # A meta tensor stands in for "a tensor on another device" on a CPU-only machine.
    with pytest.raises(ValueError, match=F_NAMED + r".*\bcpu\b.*\bmeta\b"):
        ENTRIES[entry](lambda z: torch.empty(z.shape, dtype=z.dtype, device="meta"), _z0())


@pytest.mark.parametrize("entry", ALL)
def test_f_returns_non_tensor(entry):
    with pytest.raises(TypeError, match=F_NAMED + r".*Tensor.*\btuple\b"):
        ENTRIES[entry](lambda z: (0.5 * z,), _z0())


@pytest.mark.parametrize("entry", ["fixed_point"] + list(SOLVER_FUNCS))
def test_f_not_callable(entry):
    with pytest.raises(TypeError, match=r"\bf\b.*callable.*\bint\b"):
        ENTRIES[entry](3, _z0())


def test_deq_cell_not_callable():
    with pytest.raises(TypeError, match=r"\bcell\b.*callable.*\bint\b"):
        deqfast.DEQ(3)


def test_deq_x_not_tensor_without_z0():
    layer = deqfast.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(TypeError, match=r"\bx\b.*Tensor.*\blist\b"):
        layer([1.0, 2.0])


@pytest.mark.parametrize("entry", FULL)
@pytest.mark.parametrize("backward,backward_solver", [("implicit", "fixed_point"), ("implicit", "anderson"),
                                                      ("implicit", "broyden"), ("neumann", "fixed_point")])
def test_f_not_depending_on_z_is_named_in_backward(entry, backward, backward_solver):
    """f uses z.detach(): ∂f/∂z is not in the graph, which the implicit/neumann backward needs."""
    b = torch.ones(B, D, requires_grad=True)
    out = ENTRIES[entry](lambda z: 0.5 * z.detach() + b, _z0(), backward=backward, backward_solver=backward_solver)
    z = out[0] if isinstance(out, tuple) else out
    with pytest.raises(RuntimeError, match=F_NAMED + r".*does not depend on z.*detach"):
        z.sum().backward()


def test_deq_x_not_floating_without_z0():
    layer = deqfast.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(TypeError, match=r"\bx\b.*floating.*int64"):
        layer(torch.ones(B, D, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# z0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ALL)
def test_z0_not_floating_point(entry):
    z0 = torch.arange(B * D, dtype=torch.int64).reshape(B, D) + 1
    with pytest.raises(TypeError, match=r"\bz0\b.*floating.*int64"):
        ENTRIES[entry](_contraction, z0)


@pytest.mark.parametrize("entry", ALL)
def test_z0_not_a_tensor(entry):
    with pytest.raises(TypeError, match=r"\bz0\b.*Tensor.*\blist\b"):
        ENTRIES[entry](_contraction, [[1.0, 2.0], [3.0, 4.0]])


Z0_UNSUPPORTED = [
    # (name, make z0, exception, pattern after "z0")
    ("float8", lambda: torch.zeros(B, D).to(torch.float8_e4m3fn), TypeError,
     r".*float16, bfloat16, float32 or float64.*float8_e4m3fn"),
    ("sparse_coo", lambda: torch.ones(B, D).to_sparse(), TypeError, r".*dense.*sparse_coo"),
    ("sparse_csr", lambda: torch.ones(B, D).to_sparse_csr(), TypeError, r".*dense.*sparse_csr"),
    ("meta", lambda: torch.zeros(B, D, device="meta"), ValueError, r".*device.*\bmeta\b"),
]


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("kind,make,exc,pattern", Z0_UNSUPPORTED, ids=[c[0] for c in Z0_UNSUPPORTED])
def test_z0_unsupported_tensor(entry, kind, make, exc, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        z0 = make()
    with pytest.raises(exc, match=r"\bz0\b" + pattern):
        ENTRIES[entry](_contraction, z0)


FUNC_TRANSFORMS = {
    "vmap_z0": lambda call: torch.func.vmap(lambda z0: call(_contraction, z0))(torch.zeros(2, B, D)),
    "vmap_closure": lambda call: torch.func.vmap(lambda b: call(lambda z: 0.5 * z + b, torch.zeros(B, D)))(
        torch.ones(2, B, D)),
    "grad": lambda call: torch.func.grad(lambda b: call(lambda z: 0.5 * z + b, torch.zeros(B, D)).sum())(
        torch.ones(B, D)),
}


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("transform", list(FUNC_TRANSFORMS))
def test_torch_func_transforms_are_named(entry, transform):
    """vmap/grad wrap the tensors: the solvers' buffers and fused ops cannot run on them."""
    def call(f, z0):
        out = ENTRIES[entry](f, z0)
        return out[0] if isinstance(out, tuple) else out

    with pytest.raises(RuntimeError, match=r"(\bz0\b|\bf\b|\bcell\b).*torch\.func transform.*vmap.*grad"):
        FUNC_TRANSFORMS[transform](call)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_deq_names_x_when_x_is_what_a_func_transform_wrapped(transform):
    """Without z0 the layer's only tensor is x (z0 = zeros_like(x)): the error names x, not a z0
    the user never passed."""
    layer = deqfast.DEQ(lambda z, x: 0.5 * z + x)
    run = {"vmap": lambda: torch.func.vmap(layer)(torch.ones(2, B, D)),
           "grad": lambda: torch.func.grad(lambda x: layer(x).sum())(torch.ones(B, D))}[transform]
    with pytest.raises(RuntimeError, match=r"deqfast.DEQ: x is a tensor of a torch\.func transform"):
        run()


@pytest.mark.parametrize("args", ["anderson", 3, ["anderson"]])
def test_compat_get_deq_args_of_the_wrong_type(args):
    with pytest.raises(TypeError, match=r"\bargs\b.*dict.*Namespace.*" + type(args).__name__):
        deqfast.compat.get_deq(args)


@pytest.mark.parametrize("entry", ALL)
def test_z0_zero_dim(entry):
    with pytest.raises(ValueError, match=r"\bz0\b.*batch.*0-dim"):
        ENTRIES[entry](_contraction, torch.tensor(1.5))


# ---------------------------------------------------------------------------------------------
# Choices: the message names the argument, what came and every valid choice
# ---------------------------------------------------------------------------------------------

CHOICES = [
    # (keyword, bad value, valid choices that must be listed, entries taking it)
    ("solver", "newton", ("anderson", "fixed_point", "broyden"), FULL),
    ("backward", "ift", ("implicit", "neumann", "jfb", "phantom", "bptt"), FULL),
    ("backward_solver", "newton", ("fixed_point", "anderson"), FULL),
    ("stop_mode", "max", ("rel", "abs"), ALL),
    ("backward_stop_mode", "max", ("rel", "abs"), FULL),
]


@pytest.mark.parametrize(
    "entry,keyword,value,valid",
    [(e, k, v, valid) for k, v, valid, entries in CHOICES for e in entries],
)
def test_unknown_choice(entry, keyword, value, valid):
    with pytest.raises(ValueError, match=rf"\b{keyword}\b.*{value}") as info:
        ENTRIES[entry](_contraction, _z0(), **{keyword: value})
    message = str(info.value)
    for choice in valid:
        assert re.search(rf"\b{choice}\b", message), f"{choice!r} not listed in: {message}"


# ---------------------------------------------------------------------------------------------
# Unknown keywords
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("keyword", ["max_iters", "foo"])
def test_unknown_keyword(entry, keyword):
    with pytest.raises(TypeError, match=rf"\b{keyword}\b"):
        ENTRIES[entry](_contraction, _z0(), **{keyword: 10})


def test_deq_unknown_keyword_at_construction():
    # The layer rejects it when built, before any data is seen.
    with pytest.raises(TypeError, match=r"\bbackwards\b"):
        deqfast.DEQ(lambda z, x: 0.5 * z + x, backwards="implicit")


def test_compat_get_deq_unknown_keyword():
    # torchdeq ignores keywords it does not know; compat warns, naming it (deqfast's own API raises).
    with pytest.warns(UserWarning, match=r"\bf_sovler\b"):
        deqfast.compat.get_deq(f_sovler="anderson")
    with pytest.raises(TypeError, match=r"\bf_sovler\b"):
        deqfast.fixed_point(lambda z: z, torch.zeros(2, 2), f_sovler="anderson")


# ---------------------------------------------------------------------------------------------
# Keywords of any number type: numpy scalars (a value read from an array or a config), fractions
# ---------------------------------------------------------------------------------------------

def _other_number_types():
    np = pytest.importorskip("numpy")
    from fractions import Fraction
    return {
        "max_iter": np.int64(40), "tol": Fraction(1, 10**5), "m": np.uint8(3), "lam": Fraction(1, 10**4),
        "tau": np.float32(0.75), "check_every": np.int16(2), "per_sample": np.True_,
        "backward_max_iter": np.int32(30), "backward_tol": np.float64(1e-7), "neumann_terms": np.int64(4),
        "phantom_steps": np.int8(3), "phantom_tau": Fraction(1, 2), "backward_warm_start": np.False_,
        "cuda_graph": np.False_,
    }


@pytest.mark.parametrize("backward", ["implicit", "neumann", "phantom"])
@pytest.mark.parametrize("entry", ALL)
def test_keywords_of_any_number_type_act_as_the_python_number(entry, backward):
    """A numbers.Integral/Real the checks accept (numpy's, Fraction) and a numpy bool act exactly as
    the Python int/float/bool of the same value (were: a Fraction passed the check and then failed
    inside torch, '<' not supported between 'Tensor' and 'Fraction'; numpy's bool was refused with
    "per_sample must be a bool ..., got bool")."""
    others = _other_number_types()
    takes = set(others) if entry in FULL else SOLVER_KEYWORDS[entry] | {"per_sample"}
    odd = {k: v for k, v in others.items() if k in takes}
    plain = {k: (bool(v) if k in ("per_sample", "backward_warm_start", "cuda_graph")
                 else int(v) if k in ("max_iter", "m", "check_every", "backward_max_iter", "neumann_terms",
                                      "phantom_steps") else float(v)) for k, v in odd.items()}
    if entry in FULL:
        odd["backward"] = plain["backward"] = backward
    elif backward != "implicit":
        pytest.skip("the solvers have no backward")
    x = torch.linspace(0.5, 1.5, B * D).view(B, D).requires_grad_()
    f = lambda z: torch.tanh(0.6 * z + x)
    results = []
    for kw in (odd, plain):
        if entry == "DEQ":
            layer = deqfast.DEQ(lambda z, x: f(z), **kw)
            z, stats = layer(_z0(), z0=_z0()), layer.stats
        else:
            z, stats = ENTRIES[entry](f, _z0(), **kw)
        grad = torch.autograd.grad(z.sum(), x)[0] if z.requires_grad else None
        results.append((z, stats.nstep, grad))
    (z_odd, n_odd, g_odd), (z_plain, n_plain, g_plain) = results
    torch.testing.assert_close(z_odd, z_plain, rtol=0, atol=0)
    assert n_odd.tolist() == n_plain.tolist()
    if g_plain is not None:
        torch.testing.assert_close(g_odd, g_plain, rtol=0, atol=0)


def test_compact_takes_a_numpy_bool():
    np = pytest.importorskip("numpy")
    layer = deqfast.DEQ(lambda z, x: 0.5 * z + x, compact=np.True_)
    assert layer.compact is True
    layer(torch.ones(3, 2))
    assert layer.rows_evaluated is not None


# ---------------------------------------------------------------------------------------------
# Numeric keywords out of range or of the wrong type
# ---------------------------------------------------------------------------------------------

NUMERIC = [
    # (keyword, bad value, exception)
    ("max_iter", 0, ValueError),
    ("max_iter", -3, ValueError),
    ("max_iter", 2.5, TypeError),
    ("max_iter", True, TypeError),
    ("m", 0, ValueError),
    ("m", 2.5, TypeError),
    ("tol", -0.001, ValueError),
    ("tol", float("nan"), TypeError),
    ("tol", "1e-4", TypeError),
    ("lam", -0.5, ValueError),
    ("lam", 0, ValueError),  # a singular Gram would have no defined weights
    ("lam", float("nan"), TypeError),
    ("tau", 0, ValueError),
    ("tau", 1.5, ValueError),
    ("tau", -1, ValueError),
    ("check_every", 0, ValueError),
    ("check_every", 1.5, TypeError),
    ("neumann_terms", 0, ValueError),
    ("neumann_terms", 2.5, TypeError),
    ("phantom_steps", 0, ValueError),
    ("phantom_steps", False, TypeError),
    ("phantom_tau", 0, ValueError),
    ("phantom_tau", 1.5, ValueError),
    ("phantom_tau", -1, ValueError),
    ("backward_max_iter", 0, ValueError),
    ("backward_max_iter", 2.5, TypeError),
    ("backward_tol", -1e-6, ValueError),
]


def _numeric_cases():
    for keyword, value, exc in NUMERIC:
        takers = _entries_taking(keyword) if keyword in {"max_iter", "m", "tol", "lam", "tau", "check_every"} else FULL
        for entry in takers:
            yield pytest.param(entry, keyword, value, exc, id=f"{entry}-{keyword}={value!r}")


@pytest.mark.parametrize("entry,keyword,value,exc", list(_numeric_cases()))
def test_bad_numeric_keyword(entry, keyword, value, exc):
    calls = []

    def f(z):
        calls.append(1)
        return _contraction(z)

    with pytest.raises(exc, match=rf"\b{keyword}\b.*{_value_pattern(value)}"):
        ENTRIES[entry](f, _z0(), **{keyword: value})
    assert not calls, "options must be validated before f is called"


# ---------------------------------------------------------------------------------------------
# Samples whose f produces NaN / diverges to Inf: no exception, one warning, the others untouched
# ---------------------------------------------------------------------------------------------

NB, ND = 6, 5
BAD = torch.tensor([False, True, False, False, True, False])
N_BAD = int(BAD.sum())
GOOD_IDX = (~BAD).nonzero().squeeze(1)


def _cell(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ND, ND, generator=g, dtype=torch.float64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    c = torch.randn(NB, ND, generator=g, dtype=torch.float64).to(dtype)
    z0 = torch.randn(NB, ND, generator=g, dtype=torch.float64).to(dtype)
    return W, c, z0


def _good(z, W, c):
    """tanh(W z + c) per sample, batch-invariant: row b of the result depends on row b alone."""
    return torch.tanh((z.unsqueeze(1) * W).sum(-1) + c)


def _bad_f(kind, W, c):
    """f with the samples BAD producing NaN ("nan") or diverging to Inf ("counter", "3z+1")."""
    if kind == "nan":
        return lambda z: torch.where(BAD[:, None], torch.full_like(z, float("nan")), _good(z, W, c))
    if kind == "3z+1":  # diverges under plain iteration (Anderson and Broyden solve an affine map)
        return lambda z: torch.where(BAD[:, None], 3 * z + 1, _good(z, W, c))
    if kind == "counter":  # no fixed point for any solver: the offset grows 4x per call to inf
        calls = [0]

        def f(z):
            calls[0] += 1
            return torch.where(BAD[:, None], z + 4.0 ** calls[0], _good(z, W, c))

        return f
    raise AssertionError(kind)


def _count_warning(records):
    runtime = [r for r in records if issubclass(r.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(r.message) for r in records]
    message = str(runtime[0].message)
    # It says how many failed (and of how many).
    assert re.search(rf"(?<![\d.]){N_BAD}(?![\d.]).*(?<![\d.]){NB}(?![\d.])", message), message


def _assert_stats_equal(stats, alone, idx):
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert torch.equal(getattr(stats, name)[idx], getattr(alone, name)), name


FAILING_CASES = [
    pytest.param(solver, kind, dtype, id=f"{solver}-{kind}")
    for solver in SOLVER_FUNCS
    for kind, dtype in [("nan", torch.float64), ("counter", torch.float32)]
] + [pytest.param("fixed_point_iteration", "3z+1", torch.float32, id="fixed_point_iteration-3z+1")]


@pytest.mark.parametrize("solver,kind,dtype", FAILING_CASES)
def test_solver_failing_samples(solver, kind, dtype):
    W, c, z0 = _cell(dtype)
    kw = dict(max_iter=150, tol=1e-10 if dtype == torch.float64 else 1e-5)
    solve = SOLVER_FUNCS[solver]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z, stats = solve(_bad_f(kind, W, c), z0, **kw)
    _count_warning(records)

    assert stats.failed.tolist() == BAD.tolist()
    assert not stats.converged[BAD].any()
    assert stats.converged[~BAD].all()
    assert z.shape == z0.shape and z.dtype == dtype
    assert torch.isfinite(z[BAD]).all()  # the best finite iterate
    if kind == "nan":  # f is NaN from its first call: the only iterate ever seen is z0
        assert torch.equal(z[BAD], z0[BAD])

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z_alone, alone = solve(lambda zz: _good(zz, W, c[GOOD_IDX]), z0[GOOD_IDX], **kw)
    assert not records, [str(r.message) for r in records]
    assert alone.converged.all()
    assert torch.equal(z[GOOD_IDX], z_alone)
    _assert_stats_equal(stats, alone, GOOD_IDX)


FP_CASES = [
    pytest.param(solver, kind, dtype, id=f"{solver}-{kind}")
    for solver in ("anderson", "fixed_point", "broyden")
    for kind, dtype in [("nan", torch.float64), ("counter", torch.float32)]
] + [pytest.param("fixed_point", "3z+1", torch.float32, id="fixed_point-3z+1")]


@pytest.mark.parametrize("solver,kind,dtype", FP_CASES)
def test_fixed_point_implicit_failing_samples(solver, kind, dtype):
    W, c, z0 = _cell(dtype, seed=1)
    W = W.clone().requires_grad_()
    x = c.clone().requires_grad_()  # per-sample input: its gradient is per sample
    kw = dict(solver=solver, backward="implicit", max_iter=150, tol=1e-10 if dtype == torch.float64 else 1e-5,
              backward_max_iter=150, backward_tol=1e-10 if dtype == torch.float64 else 1e-6)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(NB, ND, generator=g, dtype=torch.float64).to(dtype)

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z, stats = deqfast.fixed_point(_bad_f(kind, W, x), z0, **kw)
        assert stats.failed.tolist() == BAD.tolist()
        assert not stats.converged[BAD].any()
        assert stats.converged[~BAD].all()
        # The loss leaves out the failed samples, as a user would; backward must still run.
        loss = (z[GOOD_IDX] * weight[GOOD_IDX]).sum()
        grad_x, grad_W = torch.autograd.grad(loss, [x, W])
    _count_warning(records)  # the forward's warning only: the adjoint solve of the good samples is fine
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_W).all()
    if kind == "3z+1":  # f at the best finite iterate is finite here (for "nan" it is NaN by construction)
        assert torch.isfinite(z[BAD]).all()

    x_alone = x.detach()[GOOD_IDX].clone().requires_grad_()
    z_alone, alone = deqfast.fixed_point(lambda zz: _good(zz, W, x_alone), z0[GOOD_IDX], **kw)
    assert alone.converged.all()
    assert torch.equal(z[GOOD_IDX].detach(), z_alone.detach())
    _assert_stats_equal(stats, alone, GOOD_IDX)
    grad_x_alone, grad_W_alone = torch.autograd.grad((z_alone * weight[GOOD_IDX]).sum(), [x_alone, W])
    # Per-sample quantities; grad_W sums over the batch, so only its summation order may differ.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad_x[GOOD_IDX], grad_x_alone, rtol=rtol, atol=0)
    torch.testing.assert_close(grad_W, grad_W_alone, rtol=rtol, atol=rtol * float(grad_W_alone.abs().max()))


@pytest.mark.parametrize("solver", list(SOLVER_FUNCS))
def test_large_finite_values_are_not_a_failure(solver):
    """f(z) = 0.5 z + 1e20 in float32: every value is finite (the fixed point 2e20 is far below the
    float32 maximum 3.4e38), so no sample may be marked failed and the solve must converge."""
    z0 = _z0(torch.float32)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z, stats = SOLVER_FUNCS[solver](lambda z: 0.5 * z + 1e20, z0, max_iter=100, tol=1e-5)
    assert not records, [str(r.message) for r in records]
    assert not stats.failed.any()
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full_like(z0, 2e20), rtol=1e-4, atol=0)


def test_options_cache_keeps_types_apart():
    """Options.build caches validated keywords: a value equal to a cached one but of another type
    is validated anew (True is not 1, an OverRelaxation tau is not a float tau)."""
    from deqfast._checks import OverRelaxation
    from deqfast.options import Options

    f, z0 = (lambda z: 0.5 * z), torch.zeros(2, 3)
    for _ in range(2):
        assert deqfast.fixed_point(f, z0, max_iter=1, tol=1)[1] is not None
        with pytest.raises(TypeError, match=r"deqfast\.fixed_point: tol must be a real number >= 0\.0, got True"):
            deqfast.fixed_point(f, z0, max_iter=1, tol=True)
        with pytest.raises(TypeError, match=r"max_iter must be an int >= 1, got float 2\.0"):
            deqfast.fixed_point(f, z0, max_iter=2.0)
        assert deqfast.fixed_point(f, z0, max_iter=2)[1] is not None
    assert Options.build("c", tau=1.0) is Options.build("c", tau=1.0)  # cached
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got 1\.5"):
        Options.build("c", tau=1.5)
    assert Options.build("c", tau=OverRelaxation(1.5)).tau == 1.5
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got 1\.5"):
        Options.build("c", tau=1.5)
    assert str(Options.build("c", tol=-0.0).tol) == "-0.0" and str(Options.build("c", tol=0.0).tol) == "0.0"
