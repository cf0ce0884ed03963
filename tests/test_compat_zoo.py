"""deqfast.compat against torchdeq 0.1.0 on the call patterns of the deq-zoo programs that
tests/test_compat_programs.py does not cover: their command-line configurations (the zoo's scripts/*.sh
arguments through add_deq_args) and keyword combinations, each on a small model run with both
libraries from the same seed (only the import differs, as for a user).

Solves run to tolerances no sample reaches, or tight ones, in float64, so that compat's per-sample
stopping (README, "From torchdeq") does not enter the comparison unless a test is about it.
"""
import argparse

import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq")

import deqfast.compat as compat  # noqa: E402

F64 = torch.float64
LIBS = {"torchdeq": torchdeq, "compat": compat}


def _cell(seed, B=3, d=6, L=0.6):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = L * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(B, d, dtype=F64)


def _parse(lib, argv):
    parser = argparse.ArgumentParser()
    lib.add_deq_args(parser)
    return parser.parse_args(argv)


def _assert_info_equal(info, ref, keys=("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace"), rtol=1e-12):
    for key in keys:
        torch.testing.assert_close(info[key], ref[key].to(info[key].dtype), rtol=rtol, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------
# Damped fixed-point iteration: solver_kwargs={'tau': args.tau} (MDEQ ImageNet)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indexing", [None, [2, 4]])
def test_damped_fixed_point_iter_equals_torchdeq(indexing):
    """torchdeq's fixed_point_iter(tau=...) iterates the damped map x <- tau f(x) + (1 - tau) x,
    records the damped step's residual and returns the damped iterate (and samples it at the
    indexing steps); compat's are the same, value for value."""
    f, z0 = _cell(20)
    z, traj, info = compat.solver.fixed_point_iter(f, z0, max_iter=6, tol=1e-14, tau=0.5, indexing=indexing)
    z_ref, traj_ref, info_ref = torchdeq.solver.fixed_point_iter(f, z0, max_iter=6, tol=1e-14, tau=0.5,
                                                                 indexing=indexing)
    assert len(traj) == len(traj_ref)
    for a, b in zip([z, *traj], [z_ref, *traj_ref]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    _assert_info_equal(info, info_ref)


def test_mdeq_imagenet_solver_tau_trains_like_torchdeq():
    """MDEQ ImageNet: get_deq(args) with --f_solver fixed_point_iter --grad 5, and the call's
    solver_kwargs={'tau': args.tau}: the same states, losses and gradients."""
    f_cell, z0 = _cell(21)
    argv = ["--f_solver", "fixed_point_iter", "--f_max_iter", "8", "--f_tol", "1e-14", "--grad", "5", "--tau", "0.6"]
    runs = {}
    for name, lib in LIBS.items():
        args = _parse(lib, argv)
        torch.manual_seed(0)
        lin = nn.Linear(6, 6).double()
        deq = lib.get_deq(args)
        z_out, info = deq(lambda z: f_cell(z) + 0.1 * lin(z), z0, solver_kwargs={"tau": args.tau})
        loss = z_out[-1].square().sum()
        grads = torch.autograd.grad(loss, list(lin.parameters()))
        runs[name] = (z_out[-1].detach(), grads, info)
    (z, grads, info), (z_ref, grads_ref, info_ref) = runs["compat"], runs["torchdeq"]
    torch.testing.assert_close(z, z_ref, rtol=1e-13, atol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    _assert_info_equal(info, info_ref)


# ---------------------------------------------------------------------------------------------
# torchdeq's module paths (DEQ-LM: from torchdeq.utils.mem import mem_gc)
# ---------------------------------------------------------------------------------------------

LEAF_MODULES = {
    "utils.mem": ["mem_gc"], "utils.arg_utils": ["add_deq_args"], "utils.config": ["DEQConfig"],
    "utils.init": ["mixed_init"], "loss.correction": ["fp_correction", "register_weight_func"],
    "loss.jacobian": ["jac_reg", "power_method"],
    "norm.base_norm": ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"],
    "norm.weight_norm": ["WeightNorm"], "norm.spectral_norm": ["SpectralNorm"],
    "solver.anderson": ["anderson_solver"], "solver.broyden": ["broyden_solver"],
    "solver.fp_iter": ["fixed_point_iter", "simple_fixed_point_iter"], "solver.stat": ["SolverStat"],
}


@pytest.mark.parametrize("path", sorted(LEAF_MODULES))
def test_torchdeq_module_paths_import(path):
    """`from torchdeq.<path> import name` becomes `from deqfast.compat.<path> import name`: every
    torchdeq module path that holds a name compat has imports, with compat's object under that name."""
    import importlib
    theirs = importlib.import_module(f"torchdeq.{path}")
    ours = importlib.import_module(f"deqfast.compat.{path}")
    parent, leaf = path.split(".")
    assert getattr(getattr(compat, parent), leaf) is ours
    for name in LEAF_MODULES[path]:
        assert hasattr(theirs, name)
        assert getattr(ours, name) is getattr(getattr(compat, parent), name)
    exec(f"from deqfast.compat.{path} import {', '.join(LEAF_MODULES[path])}", {})


# ---------------------------------------------------------------------------------------------
# DEQ sequence model with --hook_ift and jac_reg on the returned state
# ---------------------------------------------------------------------------------------------

def test_hook_ift_with_jac_reg_is_the_ift_gradient():
    """DEQ-seq computes jac_reg(f(z), z) on the DEQ's returned z, then backpropagates the loss.
    With --ift both libraries agree. With --hook_ift, compat gives the same jac_reg value and the
    same IFT gradient (the two are equal by design). torchdeq 0.1.0 does not: its backward hook on z
    fires inside jac_reg's autograd.grad (so jac_reg gets the adjoint solution of its probe instead
    of the plain vector-Jacobian product) and then removes itself, so the loss gets the 1-step
    gradient. compat keeps the IFT semantics here; its hook_ift gradient is checked against
    torchdeq's ift one."""
    f_cell, z0 = _cell(22)
    W = torch.zeros(6, 6, dtype=F64, requires_grad=True)
    f = lambda z: f_cell(z) + 0.2 * torch.tanh(z @ W)
    tight = dict(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-13, b_tol=1e-13, b_max_iter=200)
    res = {}
    for name, lib in LIBS.items():
        for mode in ("ift", "hook_ift"):
            deq = lib.get_deq(**tight, **{mode: True})
            z = deq(f, z0)[0][-1]
            torch.manual_seed(0)
            jac = lib.jac_reg(f(z), z)
            grad = torch.autograd.grad(z.square().sum(), W, retain_graph=True)[0]
            grad_again = torch.autograd.grad(z.sum(), W)[0]  # a second backward through the same state
            res[name, mode] = (jac.detach(), grad, grad_again)
    for i in range(3):
        torch.testing.assert_close(res["compat", "hook_ift"][i], res["torchdeq", "ift"][i], rtol=1e-9, atol=0)
        torch.testing.assert_close(res["compat", "ift"][i], res["torchdeq", "ift"][i], rtol=1e-9, atol=0)
    # torchdeq's hook_ift here (the behaviour compat does not copy): a different jac_reg value.
    assert not torch.allclose(res["torchdeq", "hook_ift"][0], res["torchdeq", "ift"][0], rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# DEQ-Flow with --mixed_precision: f runs under autocast and returns a lower-precision part
# ---------------------------------------------------------------------------------------------

def _amp_update(seed=23):
    torch.manual_seed(seed)
    gru, head = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def func(h, c):  # DEQ-Flow's update: the hidden state comes out of autocast in bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new_h = torch.tanh(gru(torch.cat([h, c], 1)))
            delta = 0.1 * torch.tanh(head(new_h))
        return new_h, c + delta

    return func, list(gru.parameters())


@pytest.mark.filterwarnings("ignore:.*the adjoint solve stopped")
@pytest.mark.parametrize("config", [dict(f_solver="fixed_point_iter", f_max_iter=6, n_states=2),
                                    dict(f_solver="fixed_point_iter", f_max_iter=6, ift=True)], ids=["phantom", "ift"])
def test_mixed_precision_update_runs_like_torchdeq(config):
    """torchdeq takes an f whose output parts come back in another floating dtype (its torch.cat
    promotes them to the state's dtype); compat casts them to the state's dtype, the same values.
    It used to refuse them (TypeError: f(z)[0] must return dtype torch.float32)."""
    frames = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(24))
    runs = {}
    for name, lib in LIBS.items():
        func, params = _amp_update()
        deq = lib.get_deq(f_tol=1e-30, b_max_iter=5, **config)
        z_out, info = deq(func, [torch.zeros(2, 4, 5, 5), frames])
        assert all(part.dtype == torch.float32 for z in z_out for part in z)
        grads = torch.autograd.grad(sum(z[1].square().sum() for z in z_out), params)
        runs[name] = ([part.detach() for z in z_out for part in z], grads)
    for a, b in zip(runs["compat"][0], runs["torchdeq"][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # The phantom gradient is the same; the IFT one is an unconverged adjoint solve (b_max_iter=5),
    # where compat's starts one Neumann term ahead of torchdeq's (README): finite, not compared.
    for a, b in zip(runs["compat"][1], runs["torchdeq"][1]):
        if config.get("ift"):
            assert torch.isfinite(a).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:.*the adjoint solve stopped")
def test_mixed_precision_tensor_state():
    """A tensor state whose f returns bfloat16: compat iterates in the state's dtype (float32)."""
    func, params = _amp_update()
    deq = compat.get_deq(f_solver="anderson", f_max_iter=8, ift=True, b_max_iter=5)
    z0 = torch.zeros(2, 6, 5, 5)
    z_out, info = deq(lambda z: torch.cat(func(z[:, :4], z[:, 4:]), 1).bfloat16(), z0)
    assert z_out[-1].dtype == torch.float32 and info["abs_lowest"].dtype == torch.float32
    grads = torch.autograd.grad(z_out[-1].square().sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Broyden (MDEQ-CIFAR --f_solver broyden, DEQ-seq/DEQ-LM --f_solver broyden): torchdeq's bookkeeping
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indexing", [None, [3, 6]])
def test_broyden_solver_bookkeeping_equals_torchdeq(indexing):
    """torchdeq's broyden_solver evaluates f at x0 first, then makes max_iter updates; step k is the
    iterate after k updates, its residual is recorded, and the best iterate itself (not f there) is
    returned; indexing samples the best-so-far iterate after update k when k + 1 is listed. deqfast's
    Broyden takes the same steps: compat returns the same iterate, statistics and sampled states (one
    solve, sampled as it goes)."""
    f, z0 = _cell(25, L=0.9)
    z, traj, info = compat.solver.broyden_solver(f, z0, max_iter=8, tol=1e-30, indexing=indexing)
    z_ref, traj_ref, info_ref = torchdeq.solver.broyden_solver(f, z0, max_iter=8, tol=1e-30, indexing=indexing)
    assert len(traj) == len(traj_ref)
    for t, t_ref in zip(traj, traj_ref):
        torch.testing.assert_close(t, t_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=0)
    _assert_info_equal(info, info_ref, rtol=1e-8)


def test_mdeq_broyden_trains_like_torchdeq():
    """MDEQ-CIFAR's run.sh (--f_solver broyden --f_max_iter 18 --grad 5 --tau 0.7) on a small cell, the
    solve unconverged at f_max_iter: the same z*, so the same phantom-gradient states and gradients."""
    f_cell, z0 = _cell(26, L=0.9)
    argv = ["--f_solver", "broyden", "--f_max_iter", "6", "--f_tol", "1e-30", "--grad", "5", "--tau", "0.7"]
    runs = {}
    for name, lib in LIBS.items():
        args = _parse(lib, argv)
        torch.manual_seed(0)
        lin = nn.Linear(6, 6).double()
        deq = lib.get_deq(args)
        z_out, info = deq(lambda z: f_cell(z) + 0.05 * torch.tanh(lin(z)), z0)
        grads = torch.autograd.grad(z_out[-1].square().sum(), list(lin.parameters()))
        deq.eval()
        with torch.no_grad():
            z_eval, info_eval = deq(lambda z: f_cell(z) + 0.05 * torch.tanh(lin(z)), z0)
        runs[name] = (z_out[-1].detach(), grads, info, z_eval[-1], info_eval)
    ours, ref = runs["compat"], runs["torchdeq"]
    for a, b in zip([ours[0], *ours[1], ours[3]], [ref[0], *ref[1], ref[3]]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    _assert_info_equal(ours[2], ref[2], rtol=1e-8)
    _assert_info_equal(ours[4], ref[4], rtol=1e-8)


def test_broyden_warm_start_at_the_fixed_point():
    """A solve warm-started where every sample already meets tol (DEQ-Flow's fixed-point reuse across
    frames): torchdeq's Broyden makes one update and reports step 1 and its residual; compat (deqfast's
    Broyden stops at the first evaluation) reports step 1 with the residual of the returned iterate,
    z0, not an empty solve's 1e8."""
    f, z0 = _cell(27)
    z_star = torchdeq.solver.fixed_point_iter(f, z0, max_iter=300, tol=1e-14)[0]
    z, _, info = compat.solver.broyden_solver(f, z_star.clone(), max_iter=10, tol=1e-6)
    _, _, info_ref = torchdeq.solver.broyden_solver(f, z_star.clone(), max_iter=10, tol=1e-6)
    assert torch.equal(z, z_star)
    assert info["nstep"].tolist() == info_ref["nstep"].tolist() == [1.0] * 3
    torch.testing.assert_close(info["abs_lowest"], (f(z) - z).norm(dim=1), rtol=1e-12, atol=0)
    assert (info["abs_trace"][:, 1:] == info["abs_lowest"].unsqueeze(1)).all()
    assert info["abs_trace"].shape == info_ref["abs_trace"].shape


def _inr_second_derivative(lib, **kw):
    """DEQ-INR's include_grad: a loss on d output / d input (create_graph=True), differentiated again."""
    g = torch.Generator().manual_seed(31)
    W = (0.3 * torch.randn(6, 6, generator=g, dtype=F64)).requires_grad_()
    x = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    deq = lib.get_deq(f_solver="fixed_point_iter", f_max_iter=60, f_tol=1e-300, **kw)
    z_out, _ = deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros(3, 6, dtype=F64))
    (gx,) = torch.autograd.grad(z_out[-1].square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), W)[0]


def test_second_derivative_phantom_gradient_equals_torchdeq_and_ift_raises():
    """The zoo's INR configs (grad=3, no IFT) differentiate twice like torchdeq. Through the IFT
    gradient the second derivative is not implemented: a clear error naming compat's options, also
    with autograd.grad(..., inputs=params) (which skipped the error and dropped the adjoint's part);
    torchdeq 0.1.0 returns a value there that holds the adjoint constant."""
    torch.testing.assert_close(_inr_second_derivative(compat, grad=3), _inr_second_derivative(torchdeq, grad=3),
                               rtol=1e-10, atol=0)
    def my_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, **kwargs):
        z = x0
        for _ in range(max_iter):
            z = func(z)
        return z, [], compat.solver_stat_from_final_step(z, func(z), max_iter)

    compat.register_solver("my_adjoint_iter", my_iter)  # a registered b_solver: called as torchdeq calls it
    for kw in (dict(ift=True), dict(hook_ift=True), dict(ift=True, b_solver="my_adjoint_iter")):
        with pytest.raises(RuntimeError, match=r"deqfast.compat: the IFT gradient .* grad=k"):
            _inr_second_derivative(compat, **kw)
