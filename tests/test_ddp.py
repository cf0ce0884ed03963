"""DistributedDataParallel: 2 processes on gloo (CPU, loopback only) train a DEQ model exactly like one
process on the whole batch, for every backward mode.

The global batch is split in two; the loss is a mean, so DDP's averaged gradient is the gradient of
the global mean. Same initialisation, same data, 3 SGD steps; gradients and parameters after each
step agree to 1e-10 in float64 (every solver decision is per sample, so a sample's fixed point does
not depend on which process holds it). One spawn runs all the modes.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import deqfast

MODES = ["implicit", "neumann", "jfb", "phantom", "bptt"]
STEPS = 3
WORLD = 2
B, D_IN, D, D_OUT = 8, 5, 6, 3
DEQ_OPTIONS = dict(solver="anderson", max_iter=100, tol=1e-11, backward_max_iter=200, backward_tol=1e-12,
                   neumann_terms=4, phantom_steps=3)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x + b), ‖W‖₂ = 0.7."""

    def __init__(self):
        super().__init__()
        W = torch.randn(D, D, dtype=torch.float64)
        self.W = nn.Parameter(0.7 * W / torch.linalg.matrix_norm(W, 2))
        self.b = nn.Parameter(0.1 * torch.randn(D, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


class Model(nn.Module):
    def __init__(self, backward):
        super().__init__()
        torch.manual_seed(0)  # the same initialisation in every process and for the reference
        self.inject = nn.Linear(D_IN, D, dtype=torch.float64)
        self.deq = deqfast.DEQ(Cell(), backward=backward, **DEQ_OPTIONS)
        self.head = nn.Linear(D, D_OUT, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.deq(self.inject(x)))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D_IN, generator=g, dtype=torch.float64), torch.randn(B, D_OUT, generator=g, dtype=torch.float64)


def _train(module, model, x, y):
    """STEPS SGD steps of ``module`` (model or its DDP wrapper); per step the gradients and the
    parameters after the update, and the forward solve's convergence."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(module(x), y)  # a mean over the (local) batch
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        history.append((grads, params, bool(model.deq.stats.converged.all())))
    return history


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        x, y = _data()
        shard = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        results = {}
        for mode in MODES:
            model = Model(mode)
            results[mode] = _train(DistributedDataParallel(model), model, x[shard], y[shard])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only (Linux's name; CI is Linux)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _data()
    for mode in MODES:
        model = Model(mode)
        expected = _train(model, model, x, y)
        for step, (grads, params, converged) in enumerate(expected):
            assert converged, f"{mode}: the reference's forward solve did not converge"
            assert all(float(g.abs().max()) > 1e-6 for g in grads.values()), f"{mode}: a zero gradient proves nothing"
            for rank, result in enumerate(ranks):
                r_grads, r_params, r_converged = result[mode][step]
                assert r_converged, f"{mode}, rank {rank}, step {step}: the forward solve did not converge"
                for name in grads:
                    torch.testing.assert_close(r_grads[name], grads[name], rtol=1e-10, atol=1e-10,
                                               msg=lambda m: f"{mode}, rank {rank}, step {step}, grad of {name}: {m}")
                    torch.testing.assert_close(r_params[name], params[name], rtol=1e-10, atol=1e-10,
                                               msg=lambda m: f"{mode}, rank {rank}, step {step}, {name}: {m}")
