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


class _Model(nn.Module):
    """A compat DEQ between two linear maps, its cell weight-normalised as torchdeq's zoo does."""

    def __init__(self, lib=compat, norm="weight_norm", seed=0, d=8, **config):
        super().__init__()
        torch.manual_seed(seed)
        self.inj, self.cell, self.out = nn.Linear(4, d), nn.Linear(d, d), nn.Linear(d, 2)
        lib.apply_norm(self, norm, filter_out=["inj", "out"])
        self.deq = lib.get_deq(**config)

    def forward(self, x):
        u = self.inj(x)
        self.adjoint_nsteps = []
        writer = lambda info: self.adjoint_nsteps.append(info["nstep"])
        z_list, self.info = self.deq(lambda z: torch.tanh(self.cell(z) + u), torch.zeros_like(u), backward_writer=writer)
        return self.out(z_list[-1])


def test_torch_compile_of_a_compat_model_matches_eager_and_does_not_recompile_per_iteration():
    """torch.compile(model, backend="aot_eager") of a model holding a compat DEQ: the loss, every
    gradient and the adjoint's step counts are eager's, and the number of graphs dynamo compiles does
    not grow with f_max_iter (the compat solvers' per-evaluation bookkeeping, with its Python-int
    count, was recompiled at every iteration up to dynamo's recompile limit, which it then warned
    about). backward_warm_start takes effect under compile too (dynamo evaluated compat's test
    `produce_grad[-1] == self._ift`, a bound-method comparison, as False: the adjoint ran cold)."""
    from torch._dynamo.utils import counters

    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(6, 2)
    graphs = []
    for f_max_iter in (4, 8):  # (fixed_point_iter with grad=2 recompiled likewise)
        torch._dynamo.reset()
        counters.clear()
        model = _Model(f_max_iter=f_max_iter, f_tol=1e-30, f_solver="anderson", ift=True, b_solver="anderson",
                       backward_warm_start=True)
        compat.reset_norm(model)
        loss = ((torch.compile(model, backend="aot_eager")(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        graphs.append(counters["stats"]["unique_graphs"])
        nstep, adjoint_nsteps = model.info["nstep"], model.adjoint_nsteps
    compat.reset_norm(model)
    loss_eager = ((model(x) - y) ** 2).mean()
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    assert graphs[0] == graphs[1], graphs
    torch.testing.assert_close(nstep, model.info["nstep"], rtol=0, atol=0)
    assert len(adjoint_nsteps) == 1
    torch.testing.assert_close(adjoint_nsteps, model.adjoint_nsteps, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, grads_eager, rtol=1e-5, atol=1e-6)


def _step(model, opt, x, y):
    compat.reset_norm(model)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


_CONFIGS = [dict(f_solver="anderson", ift=True, f_max_iter=8), dict(f_solver="fixed_point_iter", grad=2, f_max_iter=6),
            dict(f_solver="broyden", hook_ift=True, core="indexing", n_states=2, f_max_iter=8)]


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_checkpoint_keys_are_torchdeqs_and_a_resumed_run_takes_the_same_steps(norm):
    """state_dict keys and values are torchdeq's (a checkpoint loads either way); a run saved after two
    steps with torch.save (model and optimiser) and loaded into a fresh model from another seed takes
    the same next steps, bit for bit, as the run that went on."""
    torchdeq = pytest.importorskip("torchdeq")
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.randn(6, 2)
    theirs, ours = _Model(torchdeq, norm, f_solver="anderson"), _Model(compat, norm, f_solver="anderson")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    model = _Model(compat, norm, **_CONFIGS[0])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(2):
        _step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    went_on = [_step(model, opt, x, y) for _ in range(2)]
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _Model(compat, norm, seed=5, **_CONFIGS[0])
    opt = torch.optim.Adam(resumed.parameters(), 1e-2)
    resumed.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    torch.testing.assert_close([_step(resumed, opt, x, y) for _ in range(2)], went_on, rtol=0, atol=0)


@pytest.mark.parametrize("config", _CONFIGS)
def test_a_trained_compat_model_deepcopies_and_pickles_whole(config):
    """copy.deepcopy (an EMA or a best-model copy), pickle and torch.save of the whole model after a
    training step (its normalised weights recomputed under no_grad, as torchdeq needs for a deepcopy
    too): the copy computes what the model computes. (torchdeq 0.1.0's DEQ cannot be pickled: its
    gradient functions are closures; compat's pickled with ift but not with a phantom gradient.)"""
    import copy
    import pickle

    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.randn(6, 2)
    model = _Model(compat, "spectral_norm", **config)
    _step(model, torch.optim.SGD(model.parameters(), 0.1), x, y)
    with torch.no_grad():
        compat.reset_norm(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for other in copies:
        other.eval()
        with torch.no_grad():
            compat.reset_norm(other)
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


class _TwoDEQs(nn.Module):
    """Two DEQ layers in a row, or (``same``) one DEQ module called twice per step with two f's."""

    def __init__(self, lib, same, **config):
        super().__init__()
        torch.manual_seed(0)
        self.inj, self.f, self.g, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        lib.apply_norm(self, "spectral_norm", filter_out=["inj", "out"])
        self.deq1 = lib.get_deq(**config)
        self.deq2 = self.deq1 if same else lib.get_deq(**config)

    def forward(self, x):
        u = self.inj(x)
        z = self.deq1(lambda z: torch.tanh(self.f(z) + u), torch.zeros_like(u))[0][-1]
        w = self.deq2(lambda w: torch.tanh(0.5 * self.g(w) + z), torch.zeros_like(z))[0][-1]
        return self.out(w)


@pytest.mark.parametrize("same", [False, True])
def test_train_eval_train_with_two_deqs_follows_torchdeq(same):
    """Three rounds of a training step then an eval forward under no_grad (eval_f_max_iter, the
    spectral norm reset in each mode), two DEQ layers or one DEQ called with two f's: the training
    and eval losses follow torchdeq's from the same seed (fixed-point iteration: the same iterates;
    compat stops each sample at f_tol, so the eval values agree to about the tolerance)."""
    torchdeq = pytest.importorskip("torchdeq")
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.randn(6, 2)
    config = dict(f_solver="fixed_point_iter", grad=2, f_max_iter=8, eval_f_max_iter=20, f_tol=1e-4)
    losses = []
    for lib in (torchdeq, compat):
        model = _TwoDEQs(lib, same, **config)
        opt = torch.optim.SGD(model.parameters(), 0.2)
        run = []
        for _ in range(3):
            model.train()
            lib.reset_norm(model)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                lib.reset_norm(model)
                run += [loss.detach(), ((model(x) - y) ** 2).mean()]
        losses.append(torch.stack(run))
    assert bool(losses[1][-1] < losses[1][0])  # it trains
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [dict(f_solver="anderson", ift=True), dict(f_solver="anderson", grad=3),
                                    dict(f_solver="broyden", hook_ift=True, b_tol=1e-3)])
def test_a_training_step_under_cpu_bfloat16_autocast(config):
    """A compat training step under torch.autocast("cpu", bfloat16): f runs in bfloat16, the state
    stays float32 (every f call gets a float32 z, the returned state is float32), the loss is within
    bfloat16's precision of the float32 step's and the gradients are finite and close to float32's,
    with no warning. (torchdeq 0.1.0 fails here with ift and hook_ift: a float32 adjoint meets
    bfloat16 weights, or its hook changes the gradient's dtype; with grad=3 it returns a bfloat16 state.)"""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)
    results = []
    for autocast in (False, True):
        model = _Model(compat, "weight_norm", d=16, f_max_iter=20, **config)
        seen = []
        cell = model.cell
        compat.reset_norm(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                u = model.inj(x)
                z_list, info = model.deq(lambda z: seen.append(z.dtype) or torch.tanh(cell(z) + u), torch.zeros(8, 16))
                loss = ((model.out(z_list[-1]).float() - y) ** 2).mean()
            grads = torch.autograd.grad(loss, [cell.weight_g, cell.weight_v, model.inj.weight])
        assert set(seen) == {torch.float32} and z_list[-1].dtype == torch.float32
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        results.append((loss.detach(), grads))
    (loss32, grads32), (loss16, grads16) = results
    assert not torch.equal(loss16, loss32)  # f did run in bfloat16
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    for g16, g32 in zip(grads16, grads32):
        assert float((g16 - g32).norm() / g32.norm()) < 0.1


@pytest.mark.parametrize("b_solver", ["fixed_point_iter", "anderson"])
def test_ift_under_cpu_autocast_with_a_state_in_the_autocast_dtype(b_solver):
    """z0 = torch.zeros_like(u) for a u computed under autocast is a bfloat16 state. The IFT gradient
    re-runs f in backward, which runs outside the autocast block: f's float32 weights then met the
    bfloat16 z ('mat1 and mat2 must have the same dtype'). f is re-run under the autocast state of
    the forward now (as torch.utils.checkpoint does): the gradient is finite and near float32's."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)
    grads = []
    for autocast in (False, True):
        # b_tol: a bfloat16 adjoint does not reach torchdeq's 1e-6 (compat warns that it stopped short)
        model = _Model(compat, "weight_norm", d=16, f_max_iter=20, f_solver="anderson", ift=True, b_solver=b_solver,
                       b_tol=1e-3)
        compat.reset_norm(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ((model(x).float() - y) ** 2).mean()
        grads.append(torch.autograd.grad(loss, [model.cell.weight_v, model.inj.weight]))
    for g16, g32 in zip(*grads[::-1]):
        assert bool(torch.isfinite(g16).all())
        assert float((g16 - g32).norm() / g32.norm()) < 0.1
