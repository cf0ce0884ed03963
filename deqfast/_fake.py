"""Fake (meta) kernels of the deqfast ops, so torch.compile and opcheck can trace them."""
import torch

from .ops import num_chunks
from .reference import accumulation_dtype


def register() -> None:
    @torch.library.register_fake("deqfast::anderson_history")
    def _(x, fx, F, G, slot):
        B, d = x.shape
        return x.new_empty((B, num_chunks(d), F.shape[1] + 1), dtype=accumulation_dtype(x.dtype))

    @torch.library.register_fake("deqfast::anderson_step")
    def _(x, F, G, gram, partials, best_x, best_residual, best_rel, nstep, converged, failed,
          n_filled, slot, lam, tau, tol, rel_mode):
        return torch.empty_like(x)

    @torch.library.register_fake("deqfast::fixed_point_step")
    def _(x, fx, offset, best_x, best_residual, best_rel, nstep, converged, failed, tau, tol, rel_mode):
        return torch.empty_like(x)

    @torch.library.register_fake("deqfast::anderson_fused_step")
    def _(x, fx, F, G, gram, partials, alpha, flags, best_x, best_residual, best_rel, nstep, converged, failed,
          n_filled, slot, lam, tau, tol, rel_mode):
        return torch.empty_like(x)

    @torch.library.register_fake("deqfast::broyden_direction")
    def _(U, V, x, filled):
        return torch.empty_like(x)

    @torch.library.register_fake("deqfast::broyden_update")
    def _(dx, dg, U, V, accept, filled, slot):
        return None

    @torch.library.register_fake("deqfast::broyden_fused_step")
    def _(x_next, fx_next, x, gx, U, V, restart_x, restart_g, restart_sq, pending, best_x,
          best_residual, best_rel, nstep, converged, failed, filled, slot, clear, tol, rel_mode):
        return torch.empty_like(x_next)
