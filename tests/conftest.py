"""Shared random contractive cells and float64 oracles."""
import pytest
import torch
from torch import nn

SOLVER_FUNCS = {
    "anderson": lambda: __import__("deqfast").solvers.anderson,
    "fixed_point": lambda: __import__("deqfast").solvers.fixed_point_iteration,
    "broyden": lambda: __import__("deqfast").solvers.broyden,
}


def solver_fn(name):
    return SOLVER_FUNCS[name]()


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ‖W‖₂ = contraction < 1: a contraction in z."""

    def __init__(self, d, d_in=None, contraction=0.8, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d_in = d if d_in is None else d_in
        W = torch.randn(d, d, generator=g, dtype=dtype)
        W = contraction * W / torch.linalg.matrix_norm(W, 2)
        self.W = nn.Parameter(W)
        self.U = nn.Parameter(torch.randn(d, d_in, generator=g, dtype=dtype) / d_in ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class ConvCell(nn.Module):
    """f(z, x) = tanh(conv(z) + x) with the conv scaled to a contraction (‖conv‖₂ < 1)."""

    def __init__(self, channels=2, contraction=0.7, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(channels, channels, 3, 3, generator=g, dtype=dtype)
        # ‖conv‖₂ <= Σ over taps of ‖w[:, :, i, j]‖₂ (a crude but valid bound)
        bound = sum(torch.linalg.matrix_norm(w[:, :, i, j], 2) for i in range(3) for j in range(3))
        self.weight = nn.Parameter(contraction * w / bound)
        self.bias = nn.Parameter(0.1 * torch.randn(channels, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(nn.functional.conv2d(z, self.weight, self.bias, padding=1) + x)


def dense_jacobian(f, z):
    """Per-sample dense Jacobians (B, d, d) of a per-sample map f on z (B, ...), float64."""
    B = z.shape[0]
    jac = torch.autograd.functional.jacobian(lambda zz: f(zz).reshape(B, -1), z)  # (B, d, B, ...)
    jac = jac.reshape(B, -1, B, z[0].numel())
    return torch.stack([jac[i, :, i, :] for i in range(B)])


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234


# Hypothesis profiles for tests/test_properties.py. "ci" (the default) is reproducible (derandomized,
# no example database) and keeps the file within about 2 minutes on 2 busy cores; "long" draws
# more than 10,000 examples over the properties:
#     DEQFAST_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_properties.py
try:
    import hypothesis
except ImportError:  # only test_properties.py needs it (the `test` extra installs it)
    hypothesis = None
if hypothesis is not None:
    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
    hypothesis.settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
    hypothesis.settings.register_profile("long", max_examples=2000, derandomize=False, **_common)
    import os as _os

    hypothesis.settings.load_profile(_os.environ.get("DEQFAST_HYPOTHESIS_PROFILE", "ci"))


def solve_path(path, solver, monkeypatch):
    """Force the fused CPU ops (skip where they are absent) or the reference."""
    from deqfast import ops
    from deqfast._extension import fused_available
    if path == "fused":
        if not fused_available(torch.device("cpu")):
            pytest.skip("deqfast._C not compiled")
    else:
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
