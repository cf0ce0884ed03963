"""The equilibrium cells f(z, x) -> z the benchmarks train and solve, with contractive weights.

* ``conv``: f(z, x) = GroupNorm(relu(conv(relu(conv(z))) + x)) (the cell of benchmarks/README.md);
* ``mlp``: f(z, x) = tanh(W2 relu(W1 z + b1) + x);
* ``transformer``: h = x + Attn(LN(z)); f(z, x) = LN(h + MLP(LN(h))), one pre-norm block whose
  only path from z goes through attention.

Each cell's z-path weights are rescaled by their measured spectral norm (power iteration) to a
product ``gain``. The nonlinearities (relu, tanh saturation, the normalisations) shrink that gain,
and the defaults are chosen so that the cell is contractive at its fixed point: the spectral
radius of ∂f/∂z there is about 0.8 (``spectral_radius`` measures it; the convergence benchmark
reports it), so plain iteration converges, slowly enough for the solvers to differ. Random inputs
x ~ N(0, 1) and random z0 (never zeros).
Sizes: the GPU sizes of benchmarks/README.md on CUDA, scaled down on the CPU, smaller with --quick.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F

# name -> (cuda, cpu, quick) sizes
SIZES = {
    "conv": ({"B": 32, "C": 64, "H": 32, "groups": 8},
             {"B": 8, "C": 32, "H": 32, "groups": 8},
             {"B": 4, "C": 16, "H": 16, "groups": 4}),
    "mlp": ({"B": 256, "d": 1024, "hidden": 2048},
            {"B": 64, "d": 512, "hidden": 1024},
            {"B": 32, "d": 256, "hidden": 512}),
    "transformer": ({"B": 16, "L": 256, "W": 512, "heads": 8},
                    {"B": 8, "L": 128, "W": 128, "heads": 4},
                    {"B": 4, "L": 64, "W": 64, "heads": 4}),
}


@torch.no_grad()
def operator_norm(apply: Callable, apply_t: Callable, shape, iters: int = 30, seed: int = 0) -> float:
    """Largest singular value of a linear map (apply, its transpose apply_t) on tensors of ``shape``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(shape, generator=g)
    sigma = 0.0
    for _ in range(iters):
        v = v / v.norm()
        w = apply_t(apply(v))
        sigma = float((v * w).sum()) ** 0.5
        v = w
    return sigma


def _scale_linear_(weight: torch.Tensor, target: float) -> None:
    weight.mul_(target / torch.linalg.matrix_norm(weight.detach(), 2))


class ConvCell(nn.Module):
    """f(z, x) = GroupNorm(relu(conv2(relu(conv1(z))) + x)); ‖conv1‖₂‖conv2‖₂ = ``gain``."""

    def __init__(self, C: int, H: int, groups: int, gain: float = 6.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, C)
        per_conv = gain ** 0.5
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                w = conv.weight
                sigma = operator_norm(lambda v: F.conv2d(v, w, padding=1),
                                      lambda v: F.conv_transpose2d(v, w, padding=1), (1, C, H, H))
                w.mul_(per_conv / sigma)

    def forward(self, z, x):
        return self.norm(F.relu(self.conv2(F.relu(self.conv1(z)))) + x)


class MLPCell(nn.Module):
    """f(z, x) = tanh(W2 relu(W1 z + b1) + x), ‖W1‖₂‖W2‖₂ = ``gain``."""

    def __init__(self, d: int, hidden: int, gain: float = 6.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d, bias=False)
        with torch.no_grad():
            _scale_linear_(self.fc1.weight, gain ** 0.5)
            _scale_linear_(self.fc2.weight, gain ** 0.5)

    def forward(self, z, x):
        return torch.tanh(self.fc2(F.relu(self.fc1(z))) + x)


class TransformerCell(nn.Module):
    """h = x + Attn(LN(z)); f(z, x) = LN(h + MLP(LN(h))). The value and output projections are
    scaled so that ‖W_v‖₂‖W_o‖₂ = ``gain`` (the query/key path is kept small)."""

    def __init__(self, W: int, heads: int, gain: float = 2.5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.ln_z, self.ln_h, self.ln_out = nn.LayerNorm(W), nn.LayerNorm(W), nn.LayerNorm(W)
        self.qkv = nn.Linear(W, 3 * W, bias=False)
        self.proj = nn.Linear(W, W, bias=False)
        self.fc1, self.fc2 = nn.Linear(W, 2 * W), nn.Linear(2 * W, W)
        with torch.no_grad():
            q, k, v = self.qkv.weight.chunk(3, dim=0)
            for part in (q, k):
                part.mul_(0.3)
            _scale_linear_(v, gain ** 0.5)
            _scale_linear_(self.proj.weight, gain ** 0.5)

    def forward(self, z, x):
        B, L, W = z.shape
        q, k, v = self.qkv(self.ln_z(z)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        h = x + self.proj(a)
        return self.ln_out(h + self.fc2(F.gelu(self.fc1(self.ln_h(h)))))


@dataclass
class Problem:
    """A cell on a device with its random input x and initial state z0 (random, never zeros)."""

    name: str
    cell: nn.Module
    x: torch.Tensor
    z0: torch.Tensor
    sizes: dict

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.cell.parameters())

    def describe(self) -> str:
        return " ".join(f"{k}{v}" for k, v in self.sizes.items())


def make_problem(name: str, device: torch.device, sizes: dict, seed: int = 0) -> Problem:
    """Build cell ``name`` at ``sizes`` (see SIZES) on ``device``."""
    s = sizes
    if name == "conv":
        cell = ConvCell(s["C"], s["H"], s["groups"], seed=seed)
        shape = (s["B"], s["C"], s["H"], s["H"])
    elif name == "mlp":
        cell = MLPCell(s["d"], s["hidden"], seed=seed)
        shape = (s["B"], s["d"])
    elif name == "transformer":
        cell = TransformerCell(s["W"], s["heads"], seed=seed)
        shape = (s["B"], s["L"], s["W"])
    else:
        raise ValueError(f"unknown cell {name!r}; known: {', '.join(SIZES)}")
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(shape, generator=g).to(device)
    z0 = 0.1 * torch.randn(shape, generator=g).to(device)
    return Problem(name, cell.to(device), x, z0, dict(s))


def problems(cfg, names=tuple(SIZES)) -> Dict[str, Problem]:
    """Every cell at the size for this run (CUDA / CPU / CPU --quick)."""
    out = {}
    for name in names:
        cuda, cpu, quick = SIZES[name]
        out[name] = make_problem(name, cfg.device, cfg.pick(quick=quick, cpu=cpu, cuda=cuda))
    return out


def spectral_radius(f: Callable, z: torch.Tensor, iters: int = 30) -> float:
    """Worst-sample estimate of the spectral radius of ∂f/∂z at z (power method on Jᵀ, VJPs)."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        fz = f(z_leaf)
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(z.shape, generator=g).to(z.device)
        radius = torch.zeros(z.shape[0], device=z.device)
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (z.dim() - 1)))
            w = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)[0]
            radius = w.flatten(1).norm(dim=1)
            v = w
    return float(radius.max())
