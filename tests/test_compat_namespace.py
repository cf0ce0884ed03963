"""deqfast.compat's namespace against torchdeq 0.1.0's, symbol by symbol, on the same inputs and seeds.

Names and signatures (parameter names and defaults) of every public symbol of torchdeq and its
submodules; then each utility's values: the normalisations (weights after apply, after each reset, in
training and eval mode, gradients, removal), the dropout masks, fp_correction, add_deq_args,
mixed_init, mem_gc, the solver functions and solver_stat_from_final_step, DEQ core details
(f_max_iter = 0, eval z*, the relative residual's epsilon, a custom core and solver).
"""
import argparse
import inspect
import warnings

import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq")

import deqfast  # noqa: E402
import deqfast.compat as compat  # noqa: E402

F64 = torch.float64

SUBMODULES = ["core", "norm", "loss", "utils", "dropout", "solver"]


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return {n for n in names if not inspect.ismodule(getattr(module, n))}


@pytest.mark.parametrize("sub", [None, *SUBMODULES])
def test_every_public_name_exists_with_torchdeq_signature(sub):
    import importlib
    theirs = torchdeq if sub is None else importlib.import_module(f"torchdeq.{sub}")
    ours = compat if sub is None else importlib.import_module(f"deqfast.compat.{sub}")
    names = _public(theirs)
    if sub == "solver":  # the solver functions are module attributes of torchdeq.solver, not in __all__
        names |= {"anderson_solver", "broyden_solver", "fixed_point_iter", "simple_fixed_point_iter"}
    if sub == "core":
        names |= {"DEQBase"}
    missing = sorted(n for n in names if not hasattr(ours, n))
    assert not missing, missing
    for name in names:
        a, b = getattr(theirs, name), getattr(ours, name)
        if not callable(a) or name.startswith("_"):
            continue
        sa = inspect.signature(a.__init__ if inspect.isclass(a) else a)
        sb = inspect.signature(b.__init__ if inspect.isclass(b) else b)
        pa = [(p.name, p.default, p.kind) for p in sa.parameters.values()]
        pb = [(p.name, p.default, p.kind) for p in sb.parameters.values()]
        assert pa == pb, f"{sub}.{name}: {pa} != {pb}"


def test_submodule_imports_work_like_torchdeq():
    from deqfast.compat.core import DEQIndexing, DEQSliced, get_deq  # noqa: F401
    from deqfast.compat.dropout import VariationalDropToken3d  # noqa: F401
    from deqfast.compat.loss import fp_correction, jac_reg  # noqa: F401
    from deqfast.compat.norm import apply_norm, register_norm_module  # noqa: F401
    from deqfast.compat.solver import register_solver, solver_stat_from_final_step  # noqa: F401
    from deqfast.compat.utils import add_deq_args, mem_gc, mixed_init  # noqa: F401
    assert compat.get_deq is compat.core.get_deq


# ---------------------------------------------------------------------------------------------
# norm
# ---------------------------------------------------------------------------------------------

def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 3, padding=1),
                         nn.Flatten(), nn.Linear(3 * 5 * 5, 6)).double()


NORM_CASES = [
    dict(norm_type="weight_norm"),
    dict(norm_type="weight_norm", args=dict(norm_no_scale=True, norm_target_norm=0.7)),
    dict(norm_type="weight_norm", args=dict(norm_clip=True, norm_clip_value=0.5)),
    dict(norm_type="spectral_norm"),
    dict(norm_type="spectral_norm", args=dict(sn_n_power_iters=3, norm_clip=True, norm_clip_value=0.9)),
    dict(norm_type="spectral_norm", args=dict(norm_no_scale=True, norm_target_norm=0.5)),
    dict(norm_type="weight_norm", filter_out="4"),
    dict(norm_type="spectral_norm", prefix_filter_out=["0"]),
    dict(norm_type="none"),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_norm_equals_torchdeq(case):
    case = dict(case)
    args = case.pop("args", None)
    x = torch.randn(2, 3, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    results = []
    for lib in (torchdeq.norm, compat.norm):
        model = _model(0)
        torch.manual_seed(5)
        lib.apply_norm(model, args=None if args is None else dict(args), **case)
        outs = []
        for mode in (True, True, False):  # two training-mode resets (power steps), then eval
            model.train(mode)
            lib.reset_norm(model)
            outs.append(model(x))
        grads = torch.autograd.grad(outs[1].square().sum(), [p for p in model.parameters()])
        names = sorted(n for n, _ in model.named_parameters()) + sorted(n for n, _ in model.named_buffers())
        lib.remove_norm(model)
        removed = model(x)
        results.append((outs, grads, names, removed, sorted(n for n, _ in model.named_parameters())))
    (o1, g1, n1, r1, p1), (o2, g2, n2, r2, p2) = results
    assert n1 == n2 and p1 == p2
    for a, b in zip(o1 + [r1], o2 + [r2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_register_norm_and_module():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 3, dtype=F64))

        def forward(self, x):
            return x @ self.kernel.T

    for lib in (torchdeq.norm, compat.norm):
        lib.register_norm("my_wn", type("MyWN", (lib.WeightNorm if hasattr(lib, "WeightNorm") else
                                                  torchdeq.norm.weight_norm.WeightNorm,), {"_target_modules": {}}))
        lib.register_norm_module(Scaled, "my_wn", names="kernel", dims=0)
    outs = []
    for lib in (torchdeq.norm, compat.norm):
        torch.manual_seed(0)
        m = nn.Sequential(Scaled())
        lib.apply_norm(m, "my_wn")
        lib.reset_norm(m)
        assert hasattr(m[0], "kernel_g") and hasattr(m[0], "kernel_v")
        outs.append(m(torch.ones(2, 3, dtype=F64)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

DROPOUTS = [
    ("VariationalDropout", {}, (3, 4, 5)),
    ("VariationalDropout1d", {}, (3, 4, 5)), ("VariationalDropout1d", {"token_first": False}, (3, 4, 5)),
    ("VariationalDropout2d", {}, (2, 3, 4, 5)), ("VariationalDropout2d", {"token_first": False}, (2, 3, 4, 5)),
    ("VariationalDropout3d", {}, (2, 3, 2, 4, 5)), ("VariationalDropout3d", {"token_first": False}, (2, 3, 2, 4, 5)),
    ("VariationalDropToken1d", {}, (3, 4, 5)), ("VariationalDropToken1d", {"token_first": False}, (3, 4, 5)),
    ("VariationalDropToken2d", {}, (2, 3, 4, 5)), ("VariationalDropToken2d", {"token_first": False}, (2, 3, 4, 5)),
    ("VariationalDropToken3d", {}, (2, 3, 2, 4, 5)), ("VariationalDropToken3d", {"token_first": False}, (2, 3, 2, 4, 5)),
]


@pytest.mark.parametrize("name,kw,shape", DROPOUTS)
def test_dropout_equals_torchdeq(name, kw, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    outs = []
    for lib in (torchdeq, compat):
        torch.manual_seed(3)
        drop = getattr(lib, name)(dropout=0.3, **kw)
        model = nn.Sequential(drop)
        first, again = drop(x), drop(x)
        lib.reset_dropout(model)
        redrawn = drop(x)
        drop.eval()
        outs.append((first, again, redrawn, drop(x), drop.mask.shape))
    (a1, b1, c1, d1, s1), (a2, b2, c2, d2, s2) = outs
    assert s1 == s2
    for u, v in ((a1, a2), (b1, b2), (c1, c2), (d1, d2)):
        assert torch.equal(u, v)
    assert torch.equal(a2, b2) and not torch.equal(a2, c2) and torch.equal(d2, x)


def test_compat_dropout_is_reset_by_deqfast_and_torchdeq_style_reset_deq():
    drop = compat.VariationalDropout1d(dropout=0.5)
    assert isinstance(drop, deqfast.VariationalDropout)
    x = torch.ones(2, 3, 4)
    drop(x)
    deqfast.reset_dropout(nn.Sequential(drop))
    assert drop.mask is None
    drop(x)
    compat.reset_deq(nn.Sequential(drop))
    assert drop.mask is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        compat.VariationalDropout(1.5)


# ---------------------------------------------------------------------------------------------
# loss and utils
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_func,kw", [("exp", {}), ("exp", {"gamma": 0.5}), ("linear", {}),
                                             ("linear", {"gamma": 0.3, "bias": 0.1})])
def test_fp_correction_equals_torchdeq(weight_func, kw):
    g = torch.Generator().manual_seed(4)
    preds = [torch.randn(3, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(4)]
    target, mask = torch.randn(3, 5, generator=g, dtype=F64), torch.rand(3, 5, generator=g, dtype=F64)
    crit = lambda p, t, m: ((p - t) * m).abs().mean()
    for rlv in (False, True):
        ours = compat.fp_correction(crit, (preds, target, mask), weight_func=weight_func, return_loss_values=rlv, **kw)
        theirs = torchdeq.loss.fp_correction(crit, (preds, target, mask), weight_func=weight_func,
                                             return_loss_values=rlv, **kw)
        if rlv:
            assert ours[1] == theirs[1] and len(ours[1]) == 4
            ours, theirs = ours[0], theirs[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-15, atol=0)
        ga = torch.autograd.grad(ours, preds)
        gb = torch.autograd.grad(theirs, preds)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_register_weight_func():
    w = lambda n, k, **kw: float(k + 1)
    compat.register_weight_func("ramp", w)
    torchdeq.loss.register_weight_func("ramp", w)
    preds = [torch.full((2,), float(i)) for i in range(3)]
    crit = lambda p: p.sum()
    assert float(compat.fp_correction(crit, (preds,), weight_func="ramp")) == \
        float(torchdeq.loss.fp_correction(crit, (preds,), weight_func="ramp")) == 2 * (0 + 2 * 1 + 3 * 2)
    with pytest.raises(ValueError, match="weight_func must be one of"):
        compat.fp_correction(crit, (preds,), weight_func="nope")


@pytest.mark.parametrize("argv", [[], ["--f_solver", "anderson", "--f_max_iter", "12", "--ift", "--n_states", "2",
                                       "--grad", "2", "3", "--indexing", "3", "6", "--norm_type", "spectral_norm",
                                       "--norm_clip", "--sup_loc", "1", "2", "--sradius_mode"]])
def test_add_deq_args_equals_torchdeq(argv):
    ours, theirs = argparse.ArgumentParser(), argparse.ArgumentParser()
    compat.add_deq_args(ours)
    torchdeq.add_deq_args(theirs)
    assert vars(ours.parse_args(argv)) == vars(theirs.parse_args(argv))
    assert [a.dest for a in ours._actions] == [a.dest for a in theirs._actions]


def test_mixed_init_equals_torchdeq():
    torch.manual_seed(6)
    a = compat.mixed_init((3, 4, 5))
    torch.manual_seed(6)
    b = torchdeq.utils.mixed_init((3, 4, 5))
    assert torch.equal(a, b) and (a == 0).any()


def test_mem_gc_equals_torchdeq():
    torch.manual_seed(7)
    layer = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    grads = []
    for mem_gc in (compat.mem_gc, torchdeq.utils.mem_gc):
        out = mem_gc(layer, (x,))
        grads.append((out, *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# solver
# ---------------------------------------------------------------------------------------------

def _cell(seed, B=4, d=12, L=0.6):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = L * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(B, d, dtype=F64)


@pytest.mark.parametrize("name", ["anderson_solver", "fixed_point_iter", "broyden_solver"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_solver_functions_match_torchdeq(name, stop_mode):
    f, z0 = _cell(8)
    tol = 1e-11
    z, traj, info = getattr(compat.solver, name)(f, z0, max_iter=100, tol=tol, stop_mode=stop_mode)
    z_ref, traj_ref, info_ref = getattr(torchdeq.solver, name)(f, z0, max_iter=100, tol=tol, stop_mode=stop_mode)
    assert traj == traj_ref == []
    # Both return f at an iterate within tol of the fixed point of a 0.6-contraction.
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    assert set(info) == set(info_ref)
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        assert info[key].shape == info_ref[key].shape == (4,)
    assert info["abs_trace"].shape[0] == 4 and info["abs_trace"].dim() == 2
    assert (info[f"{stop_mode}_lowest"] < tol).all()
    true = (f(z) - z).norm(dim=1)
    if name == "broyden_solver":  # torchdeq's Broyden returns its best iterate itself: the stats are its own
        torch.testing.assert_close(true, info["abs_lowest"], rtol=1e-9, atol=1e-15)
    else:  # the stats are true of the returned point's iterate: f(z) is one more step, a 0.6 contraction
        assert (true <= 0.6 * info["abs_lowest"] * (1 + 1e-6) + 1e-15).all()
    if name == "fixed_point_iter":
        # nstep is the step of the lowest residual. torchdeq iterates every sample until the last one
        # converges; compat stops each sample at its first step under tol: the slowest sample's
        # step is the same, the others' no later.
        assert (info["nstep"] <= info_ref["nstep"]).all() and info["nstep"].max() == info_ref["nstep"].max()


def test_fixed_point_iter_trajectory_equals_torchdeq():
    """indexing: the best-so-far states at the sampled steps, exactly torchdeq's for fixed-point iteration."""
    f, z0 = _cell(9)
    for indexing in ([3, 7], [5], [2, 4, 9]):
        z, traj, info = compat.solver.fixed_point_iter(f, z0, max_iter=10, tol=1e-14, indexing=indexing)
        z_ref, traj_ref, info_ref = torchdeq.solver.fixed_point_iter(f, z0, max_iter=10, tol=1e-14, indexing=indexing)
        assert len(traj) == len(traj_ref) == len(indexing)
        for a, b in zip([z, *traj], [z_ref, *traj_ref]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
        for key in ("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace"):
            torch.testing.assert_close(info[key], info_ref[key].to(info[key].dtype), rtol=1e-12, atol=0)


def test_simple_fixed_point_iter_and_final_step_stats_equal_torchdeq():
    f, z0 = _cell(10)
    func = lambda z, tau=1.0: tau * f(z) + (1 - tau) * z
    for tau in (1.0, 0.7):
        a = compat.solver.simple_fixed_point_iter(func, z0, max_iter=6, tau=tau, indexing=[2, 4])
        b = torchdeq.solver.simple_fixed_point_iter(func, z0, max_iter=6, tau=tau, indexing=[2, 4])
        assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
        for key in b[2]:
            assert torch.equal(a[2][key], b[2][key].to(a[2][key].dtype)), key
    zs = [torch.randn(3, 4, dtype=F64), torch.randn(3, 2, 2, dtype=F64)]
    fzs = [torch.randn(3, 4, dtype=F64), torch.randn(3, 2, 2, dtype=F64)]
    a = compat.solver_stat_from_final_step(zs, fzs, nstep=5)
    b = torchdeq.solver_stat_from_final_step(zs, fzs, nstep=5)
    for key in b:
        assert torch.equal(a[key], b[key].to(a[key].dtype)), key


def test_get_and_register_solver():
    assert compat.get_solver("anderson") is compat.solver.anderson_solver
    with pytest.raises(ValueError, match="newton"):
        compat.get_solver("newton")
    calls = []

    def newton(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, **kwargs):
        calls.append(max_iter)
        z = x0
        for _ in range(max_iter):
            z = func(z)
        return z, [], compat.solver_stat_from_final_step(z, func(z), max_iter)

    compat.register_solver("my_iter", newton)
    torchdeq.solver.register_solver("my_iter", newton)
    f, z0 = _cell(11)
    outs = []
    for lib in (torchdeq, compat):
        deq = lib.get_deq(f_solver="my_iter", f_max_iter=9)
        deq.eval()
        outs.append(deq(f, z0)[0][0])
    assert calls == [9, 9] and torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# core details
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("where", ["config", "solver_kwargs"])
@pytest.mark.parametrize("f_solver", ["anderson", "fixed_point_iter", "broyden"])
@pytest.mark.parametrize("grad_config", [dict(), dict(ift=True), dict(grad=3, tau=0.5)], ids=["jfb", "ift", "phantom"])
def test_f_max_iter_zero_equals_torchdeq(where, f_solver, grad_config, core):
    """No solve: in training the gradient steps start at z0 (unrolled pretraining), in eval z0 comes
    back; torchdeq's stats of an empty solve (lowest 1e8, nstep 0)."""
    f, z0 = _cell(12)
    z0 = torch.randn_like(z0)
    g = torch.Generator().manual_seed(3)
    W = (0.05 * torch.randn(12, 12, generator=g, dtype=F64)).requires_grad_()
    func = lambda z: f(z) + z @ W.T  # a contraction: the adjoint solve of IFT (at z0) converges
    cfg = dict(f_solver=f_solver, b_tol=1e-13, b_max_iter=300, core=core, **grad_config)
    call = {}
    if where == "config":
        cfg["f_max_iter"] = 0
        cfg["eval_f_max_iter"] = 0
        cfg["eval_factor"] = 0.0
    else:
        call["solver_kwargs"] = dict(f_max_iter=0)
    for train in (True, False):
        res = []
        for lib in (torchdeq, compat):
            deq = lib.get_deq(**cfg)
            deq.train(train)
            z_out, info = deq(func, z0, **call)
            grads = torch.autograd.grad(z_out[0].sum(), W) if train else None
            res.append((z_out, grads, info))
        (z1, g1, i1), (z2, g2, i2) = res
        assert len(z1) == len(z2)
        for a, b in zip(z1, z2):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        if train:
            torch.testing.assert_close(g1[0], g2[0], rtol=1e-10, atol=1e-12)
        else:
            assert torch.equal(z2[0], z0)
        for key in ("abs_lowest", "rel_lowest", "nstep"):
            torch.testing.assert_close(i2[key], i1[key].to(i2[key].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("f_solver", ["anderson", "fixed_point_iter", "broyden"])
def test_eval_returns_torchdeq_z_star_without_extra_f_call(f_solver):
    f, z0 = _cell(13)
    n_calls = {"n": 0}

    def counted(z):
        n_calls["n"] += 1
        return f(z)

    deq = compat.get_deq(f_solver=f_solver, f_max_iter=60, f_tol=1e-12)
    deq.eval()
    z_out, info = deq(counted, z0)
    ref = torchdeq.get_deq(f_solver=f_solver, f_max_iter=60, f_tol=1e-12)
    ref.eval()
    z_ref, _ = ref(f, z0)
    torch.testing.assert_close(z_out[0], z_ref[0], atol=1e-10, rtol=0)
    true = (f(z_out[0]) - z_out[0]).norm(dim=1)
    if f_solver == "broyden":  # z* is the best iterate, as torchdeq's Broyden returns it: the stats are its own
        torch.testing.assert_close(true, info["abs_lowest"], rtol=1e-9, atol=1e-15)
    else:  # z* is f at the best iterate, as torchdeq's: one more f step moves it by <= 0.6 * abs_lowest
        assert (true <= 0.6 * info["abs_lowest"] * (1 + 1e-6) + 1e-15).all()
    # Every f call was a solver evaluation: the trace (after torchdeq's 1e8 entry) counts them.
    assert n_calls["n"] == int(info["nstep"].max()) or n_calls["n"] <= 60


def test_relative_residual_uses_torchdeq_epsilon():
    """A sample whose f is ~0: torchdeq's ‖f − z‖/(‖f‖ + 1e-9) is finite, so is compat's."""
    z0 = torch.zeros(2, 3, dtype=F64)
    z0[1] = 1.0
    f = lambda z: torch.cat([1e-12 * torch.ones(1, 3, dtype=F64), 0.5 * z[1:] + 0.1], 0)
    for stop_mode in ("abs", "rel"):
        a = compat.get_deq(f_solver="fixed_point_iter", f_max_iter=5, f_tol=1e-30, f_stop_mode=stop_mode).eval()(f, z0)[1]
        b = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=5, f_tol=1e-30, f_stop_mode=stop_mode).eval()(f, z0)[1]
        for key in ("abs_lowest", "rel_lowest", "nstep"):
            torch.testing.assert_close(a[key], b[key].to(a[key].dtype), rtol=1e-12, atol=0)
        assert torch.isfinite(a["rel_lowest"]).all() and a["rel_lowest"][0] < 1e4


def test_register_deq_and_subclass():
    class MyDEQ(compat.DEQSliced):
        pass

    compat.register_deq("mine", MyDEQ)
    deq = compat.get_deq(core="mine", f_max_iter=5)
    assert isinstance(deq, MyDEQ) and deq.f_max_iter == 5
    with pytest.raises(ValueError, match="core must be one of"):
        compat.get_deq(core="nope")


def test_get_deq_string_args_is_clear_type_error():
    with pytest.raises(TypeError, match=r"args must be .*got str 'anderson'.*f_solver='anderson'"):
        compat.get_deq("anderson")


def test_call_keywords_torchdeq_ignores_warn_once():
    import deqfast.compat.utils as cu
    cu._warned.clear()
    f, z0 = _cell(14)
    deq = compat.get_deq(f_solver="anderson")
    with pytest.warns(UserWarning, match=r"'best', 'writer'"):
        z1, _ = deq(f, z0, writer=print, best=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z2, _ = deq(f, z0, writer=print, best=True)
    assert torch.equal(z1[0], z2[0])
    # deqfast's own API stays strict.
    with pytest.raises(TypeError, match="writer"):
        deqfast.fixed_point(f, z0, writer=print)


def test_coupling_probe_with_random_f():
    """An f that draws random numbers at every call (plain dropout) on independent rows: its
    randomness is not taken for coupling, and the probe advances the global RNG by one call's draws."""
    from deqfast.compat.core import _probe_coupling
    f, z0 = _cell(15)
    noisy = lambda z: torch.nn.functional.dropout(f(z), p=0.5, training=True)  # noqa: E731
    torch.manual_seed(3)
    noisy(z0)
    one_call = torch.get_rng_state()
    torch.manual_seed(3)
    assert _probe_coupling(noisy, z0) is False
    assert torch.equal(torch.get_rng_state(), one_call)
    mix = torch.full((4, 4), 0.1, dtype=F64)
    assert _probe_coupling(lambda z: noisy(z) + 0.1 * (mix @ z), z0) is True


def test_coupling_decision():
    """Independent rows: per sample. Rows coupled through f: one sample, forward and adjoint.
    per_sample fixes the choice; the probe leaves the global RNG alone."""
    f, z0 = _cell(15)
    deq = compat.get_deq(f_solver="anderson")
    torch.manual_seed(0)
    deq(f, z0)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # no global draws by the probe
    assert deq._coupled is False
    mix = torch.full((4, 4), 0.1, dtype=F64)
    coupled = lambda z: f(z) + 0.1 * (mix @ z)
    deq = compat.get_deq(f_solver="anderson", f_tol=1e-10, f_max_iter=80)
    deq.eval()
    z, info = deq(coupled, z0)
    assert deq._coupled is True
    # One best iterate for the whole state: one nstep, the stats those of that iterate.
    assert info["nstep"].unique().numel() == 1
    assert info["abs_lowest"].norm() < 1e-10
    assert compat.get_deq(per_sample=False)._coupled is True
    assert compat.get_deq(per_sample=True)._coupled is False
    with pytest.raises(ValueError, match="per_sample"):
        compat.get_deq(per_sample="yes")


@pytest.mark.parametrize("f_max_iter,tol,n_expected", [(90, 1e-10, 1), (12, 1e-14, 3)],
                         ids=["converges-before-the-first-sample", "unconverged"])
def test_indexing_core_with_anderson(f_max_iter, tol, n_expected):
    """core='indexing' with Anderson: one solve, its best-so-far states sampled at the sampled steps
    (deqfast's Anderson, not torchdeq's: the states differ). A sample after the batch converged is
    dropped, as in torchdeq, so where compat's Anderson converges sooner it returns fewer states
    (here: before the first sampled step, where torchdeq's converges before the second); the last
    state and the gradient agree with torchdeq's. Unconverged, each sampled state is closer to the
    fixed point than the one before, the last within 5x of torchdeq's continuous Anderson's."""
    f, z0 = _cell(16)
    g = torch.Generator().manual_seed(4)
    W = (0.05 * torch.randn(12, 12, generator=g, dtype=F64)).requires_grad_()
    func = lambda z: f(z) + z @ W.T
    out = []
    for lib in (torchdeq, compat):
        deq = lib.get_deq(core="indexing", f_solver="anderson", n_states=3, f_max_iter=f_max_iter, f_tol=tol)
        deq.train()
        z_list, info = deq(func, z0)
        out.append((z_list, torch.autograd.grad(sum(z.sum() for z in z_list), W)[0]))
    (z_ref, g_ref), (z, g) = out
    assert len(z) == n_expected and len(z) <= len(z_ref)
    if n_expected == 1:
        torch.testing.assert_close(z[-1], z_ref[-1], atol=1e-8, rtol=0)
        g_last = torch.autograd.grad(func(z_ref[-1].detach()).sum(), W)[0]  # torchdeq's last state's share
        torch.testing.assert_close(g, g_last, rtol=1e-6, atol=0)
    else:
        res = [float((func(s) - s).norm()) for s in z]
        assert res[0] > res[1] > res[2]
        assert res[-1] < 5 * float((func(z_ref[-1]) - z_ref[-1]).norm())
