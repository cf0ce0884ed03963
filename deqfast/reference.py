"""Pure-PyTorch reference of the fused solver steps.

These functions are the CPU fallback, the oracle the fused kernels are tested against and the
benchmark baseline. Each one does what one fused op does (``deqfast.ops`` picks between them),
over the same buffers and with the same per-sample logic:

* ``anderson_history`` — pass A of an Anderson step (after f): write f(x) and the residual
  g = f(x) − x into the ring buffers, reduce the new Gram row and ‖f(x)‖² (as partial sums).
* ``anderson_step`` — pass B: complete the Gram row, record the evaluation per sample
  (``SampleState``: best iterate, residuals, steps, converged/failed), solve each sample's
  regularised weights, mix x_next = Σ α_j f_j − (1 − τ) Σ α_j g_j and freeze finished samples.
* ``fixed_point_step`` — the same bookkeeping for a damped fixed-point step of h = f + offset;
  with offset = g it is the adjoint step u ← g + Jᵀu of the implicit backward.

The buffers are updated in place (no allocation of history per iteration). While autograd
records through the solve (``backward="bptt"``), ``anderson_recorded_step`` does the same step on a
history of the iterates' own tensors, so the unrolled solve can be differentiated.

Shapes: B samples, d elements per sample, m history slots.
"""
from __future__ import annotations

import functools

import torch

from ._checks import eager_under_compile


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gram matrix, solve and norms run in float32 for half-precision states."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def squared_norms(x: torch.Tensor, fx: torch.Tensor):
    """x, fx: (B, d). Returns (‖fx − x‖², ‖fx‖²), each (B,) in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    residual = torch.linalg.vector_norm(fx - x, dim=1, dtype=acc)
    f_norm = torch.linalg.vector_norm(fx, dim=1, dtype=acc)
    return residual.square(), f_norm.square()


@eager_under_compile
def anderson_history(x, fx, F, G, slot: int):
    """Pass A. x, fx: (B, d); F, G: (B, m, d) ring buffers of f-values and residuals.

    Writes F[:, slot] = fx and G[:, slot] = g = fx − x, and reduces the new Gram row and ‖fx‖².
    Returns (F, G, partials): partials (B, C, m + 1) in the accumulation dtype hold, per chunk of
    the sample, <G_j, g> for every slot j and then ‖fx‖²; their sum over C is the row (the fused
    kernels reduce in C = ceil(d / 4096) chunks, this reference in one). F and G are updated in
    place (returned for symmetry with the recorded path of ``anderson_recorded_step``).
    """
    acc = accumulation_dtype(x.dtype)
    g = fx - x
    F[:, slot] = fx
    G[:, slot] = g
    B, m, d = G.shape
    row = row_sums((G.to(acc) * g.to(acc).unsqueeze(1)).view(B * m, d)).view(B, m)
    f_norm_sq = torch.linalg.vector_norm(fx, dim=1, dtype=acc).square().unsqueeze(1)
    return F, G, torch.cat([row, f_norm_sq], dim=1).unsqueeze(1)


@eager_under_compile
def anderson_step(x, F, G, gram, partials, state: "SampleState", n_filled: int, slot: int, lam: float, tau: float):
    """Pass B. Completes the Gram row of ``slot`` from ``partials``, records the evaluation in
    ``state`` (best iterate, residuals, steps, convergence), solves each sample's weights and
    returns x_next (B, d) = Σ α_j F_j − (1 − τ) Σ α_j G_j, or the best iterate for a finished
    sample. Returns (gram, x_next); gram is updated in place.
    """
    m = F.shape[1]
    row = partials.sum(dim=1)  # (B, m + 1)
    gram[:, slot, :] = row[:, :m]
    gram[:, :, slot] = row[:, :m]
    done = state.update(x, row[:, slot], row[:, m])
    x_next = anderson_mix(F, G, gram, n_filled, slot, lam, tau)
    return gram, torch.where(done.unsqueeze(1), state.best_x, x_next)


@eager_under_compile
def anderson_recorded_step(x, fx, F: list, G: list, gram, state: "SampleState", n_filled: int, slot: int,
                           lam: float, tau: float):
    """Passes A and B of one Anderson step while autograd records (``backward="bptt"``).

    The same step as ``anderson_history`` + ``anderson_step``, with the history as lists of the
    iterates' own tensors (F[slot] = fx, G[slot] = g): nothing is copied per step, and the graph
    keeps one state's worth of tensors per iteration (ring buffers written in place could not be
    differentiated; copying them would save m states per iteration). Returns (gram, x_next).
    """
    acc = gram.dtype
    g = fx - x
    F[slot], G[slot] = fx, g
    g_acc = g.to(acc)
    row = torch.stack([row_sums(Gj.to(acc) * g_acc) if Gj is not None else g_acc.new_zeros(g_acc.shape[0])
                       for Gj in G], dim=1)  # (B, m)
    index = torch.tensor([slot], device=x.device)
    gram = gram.index_copy(2, index, row.unsqueeze(2)).index_copy(1, index, row.unsqueeze(1))
    done = state.update(x, row[:, slot], torch.linalg.vector_norm(fx, dim=1, dtype=acc).square())
    alpha = anderson_weights(gram, n_filled, slot, lam)
    x_next = sum(alpha[:, j:j + 1] * F[j].to(acc) for j in range(n_filled))
    if tau != 1.0:
        x_next = x_next - (1.0 - tau) * sum(alpha[:, j:j + 1] * G[j].to(acc) for j in range(n_filled))
    return gram, torch.where(done.unsqueeze(1), state.best_x, x_next.to(x.dtype))


def fixed_point_step(x, fx, offset, state: "SampleState", tau: float):
    """One damped fixed-point step of the map h(x) = fx + offset (offset None: 0), per sample.

    Records h's evaluation at x in ``state`` and returns x_next = (1 − τ) x + τ h(x), or the best
    iterate for a finished sample. With fx = Jᵀu and offset = g this is the adjoint step
    u ← g + Jᵀu of the implicit backward.
    """
    h = fx if offset is None else fx + offset
    done = state.update(x, *squared_norms(x, h))
    x_next = h if tau == 1.0 else torch.lerp(x, h, tau)
    return torch.where(done.unsqueeze(1), state.best_x, x_next)


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
    # torch.compile traces the constants into its graph; the cache serves eager calls only.
    constants = _weight_constants.__wrapped__ if torch.compiler.is_compiling() else _weight_constants
    filled, ridge, fallback = constants(m, n_filled, slot, float(lam), gram.dtype, gram.device)
    diag = gram.diagonal(dim1=1, dim2=2)
    # rsqrt only of safe values (1 for empty slots, a diagonal below tiny stands at tiny):
    # masking an infinite derivative afterwards would give 0 · inf = NaN gradients under bptt,
    # which torch.autograd.detect_anomaly reports. tiny ** -0.5 = 2^63 (float32), 2^511 (float64): exact.
    tiny = torch.finfo(gram.dtype).tiny
    small = diag < tiny
    safe = torch.where(filled & ~small, diag, 1.0)
    inv_sqrt = torch.where(filled, torch.where(small, tiny ** -0.5, safe.rsqrt()), 0.0)
    # Entries of empty slots are 0 in the Gram matrix and in inv_sqrt, so C is 0 there too.
    system = gram * (inv_sqrt.unsqueeze(2) * inv_sqrt.unsqueeze(1)) + ridge
    beta, info = torch.linalg.solve_ex(system, inv_sqrt.unsqueeze(2), check_errors=False)
    w = beta.squeeze(2) * inv_sqrt
    w_sum = w.sum(dim=1, keepdim=True)
    # Divide by 1 where the sum is unusable (0, negative, inf: e.g. a sample whose residual is
    # exactly 0, scaled by tiny ** -0.5): w / inf would be masked by the where below, but its
    # derivative w.r.t. the sum, -w / w_sum², is 0 · inf = NaN, which reached every input of
    # the solve under bptt (the gradient of a converged sample of a 1-element state was NaN).
    usable = (info == 0).unsqueeze(1) & (w_sum > 0) & torch.isfinite(w_sum)
    alpha = w / torch.where(usable, w_sum, 1.0)
    ok = usable & torch.isfinite(alpha).all(dim=1, keepdim=True)
    return torch.where(ok, alpha, fallback)


@functools.lru_cache(maxsize=256)
def _weight_constants(m: int, n_filled: int, slot: int, lam: float, dtype: torch.dtype, device: torch.device):
    """Per-(history fill, slot) constants of the weight solve, built once per solve shape."""
    filled = torch.arange(m, device=device) < n_filled
    # Built in ``dtype`` from the start: a Python float passed through torch's default dtype
    # (float32, or float16 where a user set it) would round λ first.
    ridge_diag = torch.full((m,), 1.0, dtype=dtype, device=device).masked_fill_(filled, lam)
    ridge = torch.diag_embed(ridge_diag).unsqueeze(0)  # (1, m, m)
    fallback = torch.zeros((1, m), dtype=dtype, device=device)
    fallback[0, slot] = 1.0
    return filled, ridge, fallback


def anderson_mix(F, G, gram, n_filled: int, slot: int, lam: float, tau: float):
    """Pass B. Returns x_next (B, d) = Σ α_j F_j − (1 − τ) Σ α_j G_j, i.e. the damped mix
    τ Σ α_j f(x_j) + (1 − τ) Σ α_j x_j."""
    alpha = anderson_weights(gram, n_filled, slot, lam).unsqueeze(1)  # (B, 1, m)
    # Each output element is a sum over the m slots only, which torch.bmm does not split: bitwise
    # the same for any batch size (tests/test_batch_independence.py), unlike the Gram row's sum
    # over d, and 10-50x faster than an elementwise loop over the slots.
    acc = gram.dtype
    x_next = torch.bmm(alpha, F.to(acc)).squeeze(1)
    if tau != 1.0:
        x_next = x_next - (1.0 - tau) * torch.bmm(alpha, G.to(acc)).squeeze(1)
    return x_next.to(F.dtype)


_CHUNK = 4096  # csrc/deqfast_numerics.h: kChunk


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """Σ over dim 1 of t (N, d), in an order that depends on d only (not on N or the threads).

    torch's sum over a whole (1, d) tensor splits it among threads when d is large, and
    torch.bmm picks its kernel by the batch size: either would make a sample's Gram row depend
    on which others share the batch. Here each row is summed in chunks of 4096 elements (one
    thread each; torch parallelises over the chunks), then over its chunk sums.
    """
    N, d = t.shape
    if d <= _CHUNK:
        return t.sum(dim=1)
    full = d - d % _CHUNK
    sums = t[:, :full].reshape(N, full // _CHUNK, _CHUNK).sum(dim=2)
    if full < d:
        sums = torch.cat([sums, t[:, full:].sum(dim=1, keepdim=True)], dim=1)
    return sums.sum(dim=1)


class SampleState:
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
        # A contiguous copy: the fused ops update the state in place.
        self.best_x = (x0 if torch.is_grad_enabled() and x0.requires_grad
                       else x0.detach().clone(memory_format=torch.contiguous_format))
        self.residual = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.rel_residual = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int64, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.failed = torch.zeros(B, dtype=torch.bool, device=dev)

    def reset(self, x0: torch.Tensor) -> None:
        """Back to the state of a new solve from x0, in place (a CUDA graph keeps the addresses)."""
        self.best_x.copy_(x0)
        self.residual.fill_(float("inf"))
        self.rel_residual.fill_(float("inf"))
        self.nstep.zero_()
        self.converged.zero_()
        self.failed.zero_()

    def clone(self) -> "SampleState":
        """A copy whose tensors share nothing with this state's."""
        copy = object.__new__(SampleState)
        copy.__dict__.update({name: value.clone() if isinstance(value, torch.Tensor) else value
                              for name, value in self.__dict__.items()})
        return copy

    @property
    def done(self) -> torch.Tensor:
        return self.converged | self.failed

    def update(self, x: torch.Tensor, residual_sq: torch.Tensor, f_norm_sq: torch.Tensor) -> torch.Tensor:
        """Record the evaluation of f at iterate x (B, d), given ‖f(x) − x‖² and ‖f(x)‖² (B,).
        Returns the samples that are done (converged or failed), now or before."""
        residual = residual_sq.clamp_min(0).sqrt()
        f_norm = f_norm_sq.clamp_min(0).sqrt()
        rel_residual = residual / f_norm.clamp_min(torch.finfo(residual.dtype).tiny)
        criterion = rel_residual if self.rel else residual
        best = self.rel_residual if self.rel else self.residual
        active = ~(self.converged | self.failed)
        # Failed means f produced NaN/Inf; an infinite relative residual (f(x) = 0, x != 0) is merely large.
        finite = torch.isfinite(residual) & torch.isfinite(f_norm)
        improved = active & finite & (criterion < best)
        self.best_x = torch.where(improved.unsqueeze(1), x, self.best_x)
        self.residual = torch.where(improved, residual, self.residual)
        self.rel_residual = torch.where(improved, rel_residual, self.rel_residual)
        self.nstep = self.nstep + active.long()
        converged = active & finite & (criterion < self.tol)
        failed = active & ~finite
        self.converged = self.converged | converged
        self.failed = self.failed | failed
        return self.converged | self.failed

    def freeze(self, x_next: torch.Tensor) -> torch.Tensor:
        """Finished samples stay at their best iterate."""
        return torch.where(self.done.unsqueeze(1), self.best_x, x_next)
