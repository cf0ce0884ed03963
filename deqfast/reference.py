"""Pure-PyTorch reference of the fused solver steps.

These functions are the CPU fallback, the oracle the fused kernels are tested against and the
benchmark baseline. Each one does what one fused kernel will do, over the same buffers:

* ``anderson_write_history`` — pass A of an Anderson step (after f): write f(x) and the residual
  g = f(x) − x into the ring buffers, update the Gram row of the new slot, reduce the norms.
* ``anderson_mix`` — pass B: the per-sample regularised (m×m) solve and the mixing
  x_next = Σ α_j f_j − (1 − τ) Σ α_j g_j.
* ``track_and_freeze`` — per-sample best iterate, step count, convergence and failure flags, and
  freezing of finished samples (fused into pass B on the device).

Under ``torch.no_grad`` the buffers are updated in place (no allocation per iteration). With
autograd recording (``backward="bptt"``) they are updated out of place so the unrolled solve can
be differentiated.

Shapes: B samples, d elements per sample, m history slots.
"""
from __future__ import annotations

import functools

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gram matrix, solve and norms run in float32 for half-precision states."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _in_place_ok(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def residual_norms(x: torch.Tensor, fx: torch.Tensor):
    """x, fx: (B, d). Returns (‖fx − x‖₂, ‖fx‖₂), each (B,) in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    residual = torch.linalg.vector_norm(fx - x, dim=1, dtype=acc)
    f_norm = torch.linalg.vector_norm(fx, dim=1, dtype=acc)
    return residual, f_norm


def anderson_write_history(x, fx, F, G, gram, slot: int):
    """Pass A. x, fx: (B, d); F, G: (B, m, d) ring buffers of f-values and residuals;
    gram: (B, m, m) with gram[b, i, j] = <G[b, i], G[b, j]>, in the accumulation dtype.

    Writes F[:, slot] = fx, G[:, slot] = fx − x and row/column ``slot`` of the Gram matrix.
    Returns (F, G, gram, residual, f_norm); the buffers are the same objects when updated in place.
    """
    acc = gram.dtype
    g = fx - x
    if _in_place_ok(F, G, gram, fx, x):
        F[:, slot] = fx
        G[:, slot] = g
        row = torch.bmm(G.to(acc), g.to(acc).unsqueeze(2)).squeeze(2)  # (B, m)
        gram[:, slot, :] = row
        gram[:, :, slot] = row
    else:
        index = torch.tensor([slot], device=x.device)
        F = F.index_copy(1, index, fx.unsqueeze(1))
        G = G.index_copy(1, index, g.unsqueeze(1))
        row = torch.bmm(G.to(acc), g.to(acc).unsqueeze(2))  # (B, m, 1)
        gram = gram.index_copy(2, index, row).index_copy(1, index, row.transpose(1, 2))
    residual = gram[:, slot, slot].clamp_min(0).sqrt()
    f_norm = torch.linalg.vector_norm(fx, dim=1, dtype=acc)
    return F, G, gram, residual, f_norm


def anderson_weights(gram, n_filled: int, slot: int, lam: float):
    """Mixing weights α (B, m) of type-II Anderson: argmin ‖Σ α_j g_j‖² + λ Σ α_j² ‖g_j‖² s.t. Σ α_j = 1.

    The solve runs on the Jacobi-scaled Gram matrix C = D^{-1/2} Gram D^{-1/2} (D its diagonal),
    a correlation matrix: with the ridge, C + λI has condition number at most (m + λ)/λ whatever
    the residuals' scale, so float32 is safe (an absolute ridge is swamped by Gram entries of 1e5,
    and one scaled to the largest entry swamps the newest, smallest residuals). The ridge
    penalises weight on large-residual history. One fixed-shape (m×m) solve per sample, no host
    synchronisation: empty slots get an identity row and a zero right-hand side, so their weight
    is exactly 0. A sample whose system is singular or non-finite falls back to α = e_slot, the
    plain (damped) step.
    """
    B, m, _ = gram.shape
    filled, ridge, fallback = _weight_constants(m, n_filled, slot, float(lam), gram.dtype, gram.device)
    diag = gram.diagonal(dim1=1, dim2=2)
    inv_sqrt = torch.where(filled, diag.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    # Entries of empty slots are 0 in the Gram matrix and in inv_sqrt, so C is 0 there too.
    system = gram * (inv_sqrt.unsqueeze(2) * inv_sqrt.unsqueeze(1)) + ridge
    beta, info = torch.linalg.solve_ex(system, inv_sqrt.unsqueeze(2), check_errors=False)
    w = beta.squeeze(2) * inv_sqrt
    w_sum = w.sum(dim=1, keepdim=True)
    alpha = w / w_sum
    ok = (info == 0).unsqueeze(1) & torch.isfinite(alpha).all(dim=1, keepdim=True) & (w_sum > 0)
    return torch.where(ok, alpha, fallback)


@functools.lru_cache(maxsize=256)
def _weight_constants(m: int, n_filled: int, slot: int, lam: float, dtype: torch.dtype, device: torch.device):
    """Per-(history fill, slot) constants of the weight solve, built once per solve shape."""
    filled = torch.arange(m, device=device) < n_filled
    ridge = torch.diag_embed(torch.where(filled, lam, 1.0).to(dtype)).unsqueeze(0)  # (1, m, m)
    fallback = torch.zeros((1, m), dtype=dtype, device=device)
    fallback[0, slot] = 1.0
    return filled, ridge, fallback


def anderson_mix(F, G, gram, n_filled: int, slot: int, lam: float, tau: float):
    """Pass B. Returns x_next (B, d) = Σ α_j F_j − (1 − τ) Σ α_j G_j, i.e. the damped mix
    τ Σ α_j f(x_j) + (1 − τ) Σ α_j x_j."""
    alpha = anderson_weights(gram, n_filled, slot, lam).unsqueeze(1)  # (B, 1, m)
    acc = gram.dtype
    x_next = torch.bmm(alpha, F.to(acc)).squeeze(1)
    if tau != 1.0:
        x_next = x_next - (1.0 - tau) * torch.bmm(alpha, G.to(acc)).squeeze(1)
    return x_next.to(F.dtype)


class SampleTracker:
    """Per-sample bookkeeping shared by every solver (fused into pass B on the device).

    For each sample: its best iterate so far under the stop criterion, that iterate's residuals,
    the number of f evaluations spent, and whether it converged or failed (NaN/Inf). A sample that
    converged or failed is done: it is frozen at its best iterate and its statistics stop changing,
    so a sample's result does not depend on which other samples share the batch.
    """

    def __init__(self, x0: torch.Tensor, tol: float, stop_mode: str):
        B = x0.shape[0]
        acc = accumulation_dtype(x0.dtype)
        dev = x0.device
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.best_x = x0
        self.residual = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.rel_residual = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int64, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.failed = torch.zeros(B, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)

    def update(self, x: torch.Tensor, residual: torch.Tensor, f_norm: torch.Tensor) -> None:
        """Record the evaluation of f at iterate x (B, d) with ‖f(x) − x‖ and ‖f(x)‖ (B,)."""
        rel_residual = residual / f_norm.clamp_min(torch.finfo(residual.dtype).tiny)
        criterion = rel_residual if self.rel else residual
        best = self.rel_residual if self.rel else self.residual
        active = ~self.done
        finite = torch.isfinite(criterion) & torch.isfinite(f_norm)
        improved = active & finite & (criterion < best)
        self.best_x = torch.where(improved.unsqueeze(1), x, self.best_x)
        self.residual = torch.where(improved, residual, self.residual)
        self.rel_residual = torch.where(improved, rel_residual, self.rel_residual)
        self.nstep = self.nstep + active.long()
        converged = active & finite & (criterion < self.tol)
        failed = active & ~finite
        self.converged = self.converged | converged
        self.failed = self.failed | failed
        self.done = self.done | converged | failed

    def freeze(self, x_next: torch.Tensor) -> torch.Tensor:
        """Finished samples stay at their best iterate."""
        return torch.where(self.done.unsqueeze(1), self.best_x, x_next)
