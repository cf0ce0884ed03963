"""The torchdeq program families, in miniature, run with deqfast.compat and with torchdeq 0.1.0.

Each test builds the same small model twice from the same seed, once with ``lib = torchdeq`` and once
with ``lib = deqfast.compat`` (only the import differs, as for a user), runs the family's call
patterns for a few training steps and an evaluation, and compares losses, gradients, parameters and
solver statistics. Written in our own words after the deq-zoo programs' call patterns:

* implicit graph networks: the state is (features, nodes), dim 0 is not a batch, rows coupled;
* implicit neural representations: add_deq_args + argparse, Anderson, IFT, apply_norm/reset_norm;
* DEQ sequence models: (B, L, D) states, VariationalDropout1d/DropToken1d, jac_reg, per-call
  solver_kwargs, eval with eval_factor, call keywords torchdeq ignores (writer, best);
* MDEQ image classification: a list of multi-resolution states, weight norm reset every step,
  VariationalDropout2d, phantom gradient with tau;
* optical flow (DEQ-Flow): a tuple state, n_states with fp_correction(return_loss_values=True),
  f_max_iter = 0 warm-up steps, sradius_mode in eval;
* diffusion inversion (DEQ-DDIM): all timesteps one state (T, C, H, W), coupled along dim 0.

Solves are run to tight tolerances in float64 so both libraries return points within ~1e-9 of the
same fixed point; states then agree to 1e-7 and training losses to 1e-7 relative.
"""
import argparse

import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq")

import deqfast.compat as compat  # noqa: E402

F64 = torch.float64
LIBS = {"torchdeq": torchdeq, "compat": compat}


def _close(a, b, tol, what):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    assert err < tol, f"{what}: relative difference {err:.3e}"


def _compare(runs, tol=1e-7):
    ref, ours = runs["torchdeq"], runs["compat"]
    assert ref.keys() == ours.keys()
    for key in ref:
        if isinstance(ref[key], (list, tuple)):
            assert len(ref[key]) == len(ours[key]), key
            for i, (a, b) in enumerate(zip(ours[key], ref[key])):
                _close(a, b, tol, f"{key}[{i}]")
        else:
            _close(ours[key], ref[key], tol, key)


# ---------------------------------------------------------------------------------------------
# Implicit graph networks
# ---------------------------------------------------------------------------------------------

class _IGNN(nn.Module):
    def __init__(self, lib, d=6, n_in=3, n_nodes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        A = (torch.rand(n_nodes, n_nodes, generator=g) < 0.3).double()
        A = A + A.T + torch.eye(n_nodes)
        self.register_buffer("A", A / A.sum(1, keepdim=True))  # row-normalised adjacency
        self.W = nn.Linear(d, d, bias=False).double()
        self.U = nn.Linear(n_in, d).double()
        self.head = nn.Linear(d, 2).double()
        self.deq = lib.get_deq(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-11, ift=True, b_tol=1e-11,
                               b_max_iter=200, eval_f_max_iter=200)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, x):  # x: (n_in, nodes), features first like the IGNN code
        bx = self.U(x.T).T
        f = lambda z: torch.tanh(self.W(z.T).T @ self.A + bx)  # z: (d, nodes), coupled along both dims
        z_list, info = self.deq(f, torch.zeros(self.W.weight.shape[0], x.shape[1], dtype=F64))
        return self.head(z_list[-1].T), info, f, z_list[-1]


def test_implicit_graph_network():
    """dim 0 (features) is not a batch: compat sees that rows are coupled and solves the state as
    one sample; its answer is at least as close to the fixed point as torchdeq's and its stats true."""
    x = torch.randn(3, 10, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, lib in LIBS.items():
        torch.manual_seed(3)
        model = _IGNN(lib)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, residuals = [], []
        for _ in range(2):
            logits, info, f, z = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        model.eval()
        with torch.no_grad():
            logits, info, f, z = model(x)
            residuals.append((f(z) - z).norm())
        runs[name] = dict(losses=losses, logits=logits, params=[p.detach().clone() for p in model.parameters()])
        if name == "compat":
            assert model.deq._coupled is True
            # Stats true of the returned point: z = f(x*) and ‖f(z) − z‖ ≤ 0.5‖f(x*) − x*‖ (f a 0.5-contraction).
            assert float(residuals[0]) <= 0.5 * float(info["abs_lowest"].norm()) * (1 + 1e-6) + 1e-14
            ours_res = residuals[0]
        else:
            ref_res = residuals[0]
    assert float(ours_res) <= max(float(ref_res), 1e-13)
    _compare(runs)


# ---------------------------------------------------------------------------------------------
# Implicit neural representations: argparse + add_deq_args, Anderson, IFT, weight norm
# ---------------------------------------------------------------------------------------------

class _INR(nn.Module):
    def __init__(self, lib, args, width=8):
        super().__init__()
        self.inp = nn.Linear(2, width).double()
        self.hidden = nn.Linear(width, width).double()
        self.out = nn.Linear(width, 3).double()
        lib.apply_norm(self.hidden, args=args)
        self.deq = lib.get_deq(args)
        self.lib = lib

    def forward(self, coords):
        self.lib.reset_norm(self.hidden)
        u = self.inp(coords)
        f = lambda z: torch.sin(0.5 * self.hidden(z)) + u
        z_list, info = self.deq(f, torch.zeros_like(u))
        return self.out(z_list[-1]), info


def test_implicit_neural_representation():
    argv = ["--f_solver", "anderson", "--f_max_iter", "100", "--f_tol", "1e-9", "--ift", "--b_max_iter", "80",
            "--b_tol", "1e-11", "--norm_type", "weight_norm", "--norm_target_norm", "0.8", "--norm_no_scale"]
    g = torch.Generator().manual_seed(4)
    coords = torch.rand(16, 2, generator=g, dtype=F64) * 2 - 1
    rgb = torch.rand(16, 3, generator=g, dtype=F64)
    runs = {}
    for name, lib in LIBS.items():
        parser = argparse.ArgumentParser()
        lib.add_deq_args(parser)
        parser.add_argument("--lr", type=float, default=1e-2)
        args = parser.parse_args(argv)
        torch.manual_seed(5)
        model = _INR(lib, args)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        losses = []
        for _ in range(3):
            pred, info = model(coords)
            loss = (pred - rgb).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            assert (info["abs_lowest"] < 1e-9).all()
        model.eval()
        with torch.no_grad():
            pred, info = model(coords)
        runs[name] = dict(losses=losses, pred=pred)
    _compare(runs)


# ---------------------------------------------------------------------------------------------
# DEQ sequence models
# ---------------------------------------------------------------------------------------------

class _SeqDEQ(nn.Module):
    def __init__(self, lib, d=8):
        super().__init__()
        self.mix = nn.Linear(d, d).double()
        self.attn = nn.Linear(d, d).double()
        self.drop = lib.VariationalDropout1d(dropout=0.2)
        self.drop_tok = lib.VariationalDropToken1d(dropout=0.1)
        self.deq = lib.get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-11, f_stop_mode="rel", grad=2, tau=0.8,
                               eval_factor=1.5)
        self.lib = lib
        with torch.no_grad():
            self.mix.weight.mul_(0.4 / torch.linalg.matrix_norm(self.mix.weight, 2))

    def forward(self, emb, **call):
        self.lib.reset_deq(self)
        u = self.attn(emb)

        def f(z):
            ctx = torch.cumsum(z, dim=1) / torch.arange(1, z.shape[1] + 1, dtype=F64).view(1, -1, 1)  # causal mean
            return self.drop(torch.tanh(self.mix(ctx) + self.drop_tok(u)))

        z_list, info = self.deq(f, torch.zeros_like(emb), **call)
        z = z_list[-1]
        z_leaf = z.detach().requires_grad_()
        jac = self.lib.jac_reg(f(z_leaf), z_leaf) if self.training else torch.zeros(())
        return z, info, jac


def test_deq_sequence_model():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(3, 5, 8, generator=g, dtype=F64)
    target = torch.randn(3, 5, 8, generator=g, dtype=F64)
    runs = {}
    for name, lib in LIBS.items():
        torch.manual_seed(7)
        model = _SeqDEQ(lib)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses, jacs = [], []
        for step in range(3):
            torch.manual_seed(100 + step)  # the dropout masks and jac_reg's probes
            call = dict(solver_kwargs=dict(f_max_iter=30 + step, m=5)) if step else dict(writer=None, best=True)
            if name == "compat" and step == 0:
                compat.utils._warned.clear()  # warned once per process: make this the first time
                with pytest.warns(UserWarning, match="'best', 'writer'"):
                    z, info, jac = model(emb, **call)
            else:
                z, info, jac = model(emb, **call)
            loss = (z - target).square().mean() + 0.1 * jac
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            jacs.append(jac.detach())
        model.eval()
        with torch.no_grad():
            z, info, _ = model(emb)
        assert (info["rel_lowest"] < 1e-11).all()
        runs[name] = dict(losses=losses, jacs=jacs, z=z)
    _compare(runs)


# ---------------------------------------------------------------------------------------------
# MDEQ image classification: list states, weight norm every step, phantom gradient
# ---------------------------------------------------------------------------------------------

class _MDEQ(nn.Module):
    def __init__(self, lib, c=2):
        super().__init__()
        self.conv_hi = nn.Conv2d(c, c, 3, padding=1).double()
        self.conv_lo = nn.Conv2d(c, c, 3, padding=1).double()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1).double()
        self.stem = nn.Conv2d(1, c, 3, padding=1).double()
        self.head = nn.Linear(2 * c, 4).double()
        self.drop = lib.VariationalDropout2d(dropout=0.1, token_first=False)
        lib.apply_norm(self, "weight_norm", filter_out=["stem"], target_norm=0.2, learn_scale=False)
        self.deq = lib.get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-11, grad=3, tau=0.6)
        self.lib = lib

    def forward(self, img):
        self.lib.reset_deq(self)
        u = self.stem(img)

        def f(z_hi, z_lo):
            hi = torch.tanh(self.drop(self.conv_hi(z_hi)) + u)
            lo = torch.tanh(self.conv_lo(z_lo) + self.down(z_hi))
            return [hi, lo]

        z_init = [torch.zeros_like(u), torch.zeros(u.shape[0], u.shape[1], u.shape[2] // 2, u.shape[3] // 2, dtype=F64)]
        z_list, info = self.deq(f, z_init)
        hi, lo = z_list[-1]
        return self.head(torch.cat([hi.mean((2, 3)), lo.mean((2, 3))], 1)), info


def test_mdeq_image_classification():
    g = torch.Generator().manual_seed(8)
    img = torch.randn(4, 1, 4, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (4,), generator=g)
    runs = {}
    for name, lib in LIBS.items():
        torch.manual_seed(9)
        model = _MDEQ(lib)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            torch.manual_seed(200 + step)
            logits, info = model(img)
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        model.eval()
        with torch.no_grad():
            logits, info = model(img)
        runs[name] = dict(losses=losses, logits=logits, params=[p.detach().clone() for p in model.parameters()])
    _compare(runs)


# ---------------------------------------------------------------------------------------------
# Optical flow (DEQ-Flow): tuple state, n_states + fp_correction, f_max_iter = 0 warm-up
# ---------------------------------------------------------------------------------------------

class _Flow(nn.Module):
    def __init__(self, lib, c=4):
        super().__init__()
        self.gru = nn.Conv2d(2 * c + 2, c, 3, padding=1).double()
        self.flow_head = nn.Conv2d(c, 2, 3, padding=1).double()
        self.ctx = nn.Conv2d(2, c, 3, padding=1).double()
        self.deq = lib.get_deq(argparse.Namespace(f_solver="fixed_point_iter", f_max_iter=24, f_tol=1e-12,
                                                  n_states=2, core="sliced", grad=[1], ift=False, lr=1e-3))
        self.c = c

    def forward(self, frames, f_max_iter=None, sradius_mode=False):
        inp = self.ctx(frames)

        def update(net, flow):
            net = 0.5 * torch.tanh(self.gru(torch.cat([net, inp, flow], 1))) + 0.5 * net
            return net, 0.3 * torch.tanh(self.flow_head(net)) + 0.5 * frames

        z_init = (torch.zeros_like(inp), torch.zeros_like(frames))
        kw = dict(solver_kwargs={"f_max_iter": f_max_iter}) if f_max_iter is not None else {}
        z_out, info = self.deq(update, z_init, sradius_mode=sradius_mode, **kw)
        return [flow for _, flow in z_out], info


def test_optical_flow():
    g = torch.Generator().manual_seed(10)
    frames = torch.randn(2, 2, 5, 5, generator=g, dtype=F64)
    flow_gt = torch.randn(2, 2, 5, 5, generator=g, dtype=F64)
    valid = (torch.rand(2, 1, 5, 5, generator=g) > 0.2).double()
    crit = lambda pred, gt, mask: ((pred - gt).abs() * mask).mean()
    runs = {}
    for name, lib in LIBS.items():
        torch.manual_seed(11)
        model = _Flow(lib)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses, values = [], []
        for step in range(3):
            flows, info = model(frames, f_max_iter=0 if step == 0 else None)  # warm-up: unrolled, no solve
            loss, loss_values = lib.fp_correction(crit, (flows, flow_gt, valid), gamma=0.8, return_loss_values=True)
            assert len(loss_values) == len(flows) == 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            values += loss_values
        model.eval()
        torch.manual_seed(12)  # the power method's start vector
        with torch.no_grad():
            flows, info = model(frames, sradius_mode=True)
        runs[name] = dict(losses=losses, values=values, flow=flows[-1], sradius=info["sradius"])
    _compare(runs, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Diffusion inversion (DEQ-DDIM): all timesteps one state, coupled along dim 0
# ---------------------------------------------------------------------------------------------

def _ddim(seed=13, T=6):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 2, 4, 4, generator=g, dtype=F64)
    a = torch.linspace(0.9, 0.99, T, dtype=F64).view(T, 1, 1, 1)
    b = torch.linspace(0.3, 0.05, T, dtype=F64).view(T, 1, 1, 1)
    torch.manual_seed(14)
    eps_net = nn.Conv2d(2, 2, 3, padding=1).double()

    def f(x):  # x_t = a_t x_{t-1} + b_t eps(x_{t-1}), x_{-1} = the noise
        prev = torch.cat([noise, x[:-1]], 0)
        return a * prev + b * torch.tanh(eps_net(prev))

    return f, eps_net, torch.zeros(T, 2, 4, 4, dtype=F64)


def test_diffusion_inversion():
    """All timesteps solved jointly; dim 0 is time, not a batch. Row t depends on earlier rows only:
    a row that converged stays converged if the rows before it did, so every row of compat's answer
    meets the tolerance, as torchdeq's does; training (1-step gradient) matches torchdeq."""
    runs, residuals = {}, {}
    for name, lib in LIBS.items():
        f, eps_net, z0 = _ddim()
        deq = lib.get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-10)
        losses = []
        opt = torch.optim.SGD(eps_net.parameters(), lr=0.1)
        for _ in range(2):
            deq.train()
            z_list, info = deq(f, z0)
            loss = z_list[-1][-1].square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        deq.eval()
        with torch.no_grad():
            z_list, info = deq(f, z0)
            residuals[name] = (f(z_list[0]) - z_list[0]).flatten(1).norm(dim=1)
            assert (info["abs_lowest"] < 1e-9).all()
        runs[name] = dict(losses=losses, sample=z_list[0][-1])
        assert (residuals[name] < 1e-10).all(), name
    _compare(runs)


def test_diffusion_inversion_implicit_gradient_is_exact():
    """IFT on the coupled timestep state: compat's gradient equals the exact one (differentiating
    through T + 2 plain steps, exact here: ∂f/∂x is nilpotent). The adjoint rows are coupled as the
    forward rows are, and compat solves the adjoint of a coupled state as one sample. (torchdeq 0.1.0
    keeps each row's lowest-residual adjoint iterate, which here is the all-zero first one for every
    row the loss does not touch: its IFT gradient on this problem equals the 1-step gradient.)"""
    f, eps_net, z0 = _ddim()
    deq = compat.get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-11, ift=True, b_tol=1e-12, b_max_iter=60)
    deq.train()
    for _ in range(2):  # the first solve decides that the rows are coupled
        z_list, _ = deq(f, z0)
    ours = torch.autograd.grad(z_list[-1][-1].square().mean(), list(eps_net.parameters()))
    assert deq._coupled is True
    z = z0
    for _ in range(z0.shape[0] + 2):
        z = f(z)
    exact = torch.autograd.grad(z[-1].square().mean(), list(eps_net.parameters()))
    for a, b in zip(ours, exact):
        _close(a, b, 1e-8, "IFT gradient")
