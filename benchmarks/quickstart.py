"""Solve and train a small DEQ layer on random data and print its solver statistics.

    python benchmarks/quickstart.py

A smoke run of the whole stack: the forward Anderson solve, the implicit backward (adjoint
fixed-point solve), and a few optimiser steps, printing per-sample stats as it goes.
"""
import argparse
import time

import torch
from torch import nn

import deqfast


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), W kept contractive by spectral normalisation."""

    def __init__(self, width: int, d_in: int):
        super().__init__()
        self.W = nn.utils.parametrizations.spectral_norm(nn.Linear(width, width, bias=False))
        self.U = nn.Linear(d_in, width)

    def forward(self, z, x):
        return torch.tanh(0.9 * self.W(z) + self.U(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--backward", default="implicit", choices=["implicit", "neumann", "jfb", "phantom", "bptt"])
    args = parser.parse_args()

    torch.manual_seed(0)
    d_in, classes = 32, 10
    x = torch.randn(args.batch, d_in)
    y = torch.randint(0, classes, (args.batch,))
    cell = Cell(args.width, d_in)
    deq = deqfast.DEQ(cell, solver="anderson", max_iter=30, tol=1e-4, backward=args.backward)
    head = nn.Linear(args.width, classes)
    opt = torch.optim.Adam(list(cell.parameters()) + list(head.parameters()), lr=1e-2)

    print(f"deqfast {deqfast.__version__}, torch {torch.__version__}, extension: {deqfast.extension_info()['reason']}")
    for step in range(args.steps):
        start = time.perf_counter()
        # cached(): the spectral-normalised W is computed once per step, so f is the same map at
        # every solver iteration (its power iteration would otherwise move f during the solve).
        # Touch it first with autograd on: computed once, with its graph (first computed inside the
        # solver's no_grad, deqfast drops it after the solve and f(z*) computes it again).
        with nn.utils.parametrize.cached():
            cell.W.weight
            z = deq(x, torch.zeros(args.batch, args.width))
        loss = nn.functional.cross_entropy(head(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ms = 1e3 * (time.perf_counter() - start)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  {ms:6.1f} ms  forward: {deq.stats.summary()}")


if __name__ == "__main__":
    main()
