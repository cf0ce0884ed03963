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
