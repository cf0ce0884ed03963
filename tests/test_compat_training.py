"""deqfast.compat in the parts of a training run the other compat tests do not cover: torch.compile
of a model around a compat DEQ, checkpoints (state_dict, torch.save, resume), copies (deepcopy,
pickle), mode switches, mixed precision on the CPU."""
import io
import warnings

import pytest
import torch
from torch import nn

import deqfast
import deqfast.compat as compat


def _cell(seed=0, d=8, B=4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1
    c = torch.randn(B, d, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ W + c)), torch.zeros(B, d, dtype=torch.float64)


def test_torch_compile_with_a_z0_written_in_place_before_is_not_refused():
    """f's in-place check reads z's version counter before and after f. Under torch.compile dynamo
    traced that read into the frame around f(z): the compiled frame kept the version it saw at its
    first compile (0), so a later z0 with a nonzero counter (a buffer filled in place, a second model
    compiled in the process: compat's state after its coupling probe) was refused with 'f modified
    its argument z in place' although f wrote nothing."""
    torch._dynamo.reset()
    solver = "broyden"  # the check is the solvers' common call_f
    f, z0 = _cell()
    run = lambda z0: deqfast.fixed_point(f, z0, solver=solver, max_iter=6)[0]
    compiled = torch.compile(run, backend="aot_eager")
    compiled(z0.clone())
    z1 = z0.clone()
    z1.add_(0.0)  # the same values, version counter 1
    assert z1._version > 0
    torch.testing.assert_close(compiled(z1), run(z1), rtol=0, atol=1e-12)
    # a real in-place write by f is still caught under compile
    bad = lambda z: torch.tanh(z.mul_(0.5))
    with pytest.raises(RuntimeError, match="modified its argument z in place"):
        torch.compile(lambda z0: deqfast.fixed_point(bad, z0, solver=solver, max_iter=3)[0],
                      backend="aot_eager")(z1.clone())
