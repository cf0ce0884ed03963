"""deqfast.DEQ: a drop-in equilibrium layer around a cell f(z, x) -> z."""
from __future__ import annotations

import collections
import contextlib
import itertools
from typing import Optional

import torch
from torch import nn

from . import _checks
from .dropout import VariationalDropout, record_users
from .solvers import _active, _graph
from .backward import ExplicitF
from .functional import solve
from .options import Options
from .stats import SolverStats


class DEQ(nn.Module):
    """z* = cell(z*, x), differentiated implicitly (or as ``backward`` says).

    Args:
        cell: module or callable (z, x) -> z with z of the shape of z0 (by default that of x);
            for a state of several tensors, z0 is a list/tuple and cell maps one to one like it.
        compact: evaluate the cell only on the samples still active (not yet converged) at the
            solver's last host check (every ``check_every`` evaluations): it gathers their rows of
            z and x (a tensor with the batch on dim 0), calls the cell and scatters the result. Only
            for cells whose samples are independent (no batch statistics); same result as
            compact=False to the tolerance. Not for backward="bptt" (ignored there).
        **keywords: those of :func:`deqfast.fixed_point` (solver, max_iter, tol, backward, ...).
            With ``cuda_graph=True`` the layer keeps the solve's CUDA graphs across calls (below).

    In training mode each forward first resets the masks of the cell's
    :class:`deqfast.VariationalDropout` modules, so every f call of one forward shares a mask. A cell
    that is not a module (``lambda z, x: self.block(z, x)``) hides its modules: the layer then resets
    those that applied a mask during its previous forward.

    Batch norm in a cell that is a module, in training mode: every f call normalises with the
    batch's statistics, but the running statistics (and ``num_batches_tracked``) are updated only
    by the evaluations after the solve, at the equilibrium: once per forward (``phantom``: once per
    phantom step; ``bptt``: at every iteration, each being part of the model).

    ``cuda_graph=True`` on a CUDA state: the graphs of the forward solve's iterations are captured
    once per key and replayed by later calls with the same key -- z's and x's shapes, dtypes and
    devices, the options, the cell's training flags, the autocast and inference modes, and the
    address, shape and dtype of each of the cell's parameters and buffers (a parameter replaced by
    a new tensor changes the key; one updated in place, as by an optimiser, does not). The layer
    copies each call's x (a tensor or a list/tuple of tensors) into static tensors that the cell
    reads during the solve, and the solver resets its buffers in place: the same bits as the eager
    solve. The cell must read nothing else that changes between calls (a tensor attribute that is
    not a parameter or buffer, a global). The ``graph_cache_size`` most recently used keys are
    kept. Where this does not apply (a cell that is not an nn.Module, another x, a training-mode
    VariationalDropout in the cell) the graphs live for one solve, as with :func:`deqfast.fixed_point`.

    Attributes:
        stats: :class:`SolverStats` of the last forward solve (``stats.backward`` after backward).
        graph_captures: CUDA graphs this layer has captured (cuda_graph=True; 0 on the CPU).

    Example:
        >>> layer = deqfast.DEQ(cell, solver="anderson", max_iter=30, backward="implicit")
        >>> z = layer(x)            # (B, ...) like x
    """

    def __init__(self, cell, *, compact: bool = False, **keywords):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"deqfast.DEQ: cell must be callable (z, x) -> z, got {type(cell).__name__}")
        self.cell = cell
        self.compact = _checks.check_bool("deqfast.DEQ", "compact", compact)
        self.options = Options.build("deqfast.DEQ", **keywords)
        if compact and not self.options.per_sample:
            raise ValueError("deqfast.DEQ: compact=True gathers the samples still active, which needs per_sample=True "
                             "(independent samples); got per_sample=False (one coupled state)")
        if compact and self.options.cuda_graph:
            raise ValueError("deqfast.DEQ: compact=True changes the shapes f sees as samples finish, which a captured "
                             "CUDA graph cannot replay; use compact=True or cuda_graph=True, got both")
        # after the keywords: their errors come first
        _checks.check_arguments("deqfast.DEQ", "cell", cell, "a callable (z, x) -> z (DEQ calls cell(z, x))", 2,
                                "give it an x argument (forward(self, z, x)), or solve a map of z alone with "
                                "deqfast.fixed_point(f, z0)")
        self.stats: Optional[SolverStats] = None
        self.rows_evaluated: Optional[int] = None  # compact=True: cell rows evaluated by the last solve
        self.graph_captures = 0
        self._warned_plain_dropout = False  # a torch.nn dropout in the cell: looked for (and warned) once
        self._graphs: "collections.OrderedDict[tuple, _KeptGraphs]" = collections.OrderedDict()
        self._dropout_users: dict = {}  # VariationalDropout modules the cell used in the last forward (by id)

    graph_cache_size = 4  # keys whose CUDA graphs a DEQ(cuda_graph=True) keeps, least recently used dropped

    def forward(self, x, z0=None):
        if z0 is None:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"deqfast.DEQ: x must be a torch.Tensor when z0 is not given, got {type(x).__name__}"
                                f"{_checks.conversion_hint(x, 'x')}"
                                + ("; with a list/tuple x (several inputs) pass z0 as well" if isinstance(x, (list, tuple)) else ""))
            if not x.is_floating_point():
                raise TypeError(f"deqfast.DEQ: x must be floating point when z0 is not given (z0 = zeros_like(x)), got "
                                f"{x.dtype}{_checks.complex_hint(x, 'z0')}")
            _checks.check_not_in_func_transform("deqfast.DEQ", "x", x)
            z0 = torch.zeros_like(x)
        elif _batch_mismatch(x, z0):
            try:
                return self._forward(x, z0)
            except Exception as exc:  # a cell that fails on it: say why in the traceback (Python >= 3.11)
                if hasattr(exc, "add_note"):
                    exc.add_note(f"deqfast.DEQ: {_batch_mismatch(x, z0)}: DEQ calls cell(z, x) with z shaped like "
                                 f"z0, so z0 needs x's batch size on dim 0 (or leave z0 out: zeros_like(x))")
                raise
        return self._forward(x, z0)

    def _forward(self, x, z0):
        # the cell's modules, walked once for both uses below (nothing between them changes the tree)
        mods = list(self.cell.modules()) if isinstance(self.cell, nn.Module) and (
            self.training or self.options.backward != "bptt") else None
        if self.training:  # one variational-dropout mask per forward, fixed during the solve
            if mods is not None:  # reset_dropout(self.cell), on the modules already listed
                for mod in mods:
                    if isinstance(mod, VariationalDropout):
                        mod.reset()
                if not getattr(self, "_warned_plain_dropout", False):  # (absent in a DEQ pickled before)
                    self._warn_plain_dropout()
            for mod in getattr(self, "_dropout_users", {}).values():  # those a plain-callable cell used last time
                mod.reset()
        self._dropout_users = {}
        norms = _RunningStats(self.cell, mods) if self.options.backward != "bptt" else None
        with record_users(self._dropout_users), (norms or contextlib.nullcontext()):
            if self.compact and self.options.backward != "bptt":
                return self._compact_forward(x, z0, norms)
            if self.options.cuda_graph and self._graphs_keepable(x, z0):
                return self._graphed_forward(x, z0, norms)
            z, self.stats = solve(lambda z: self.cell(z, x), z0, self.options, caller="deqfast.DEQ",
                                  after_solver=norms.release if norms else None, explicit=self._explicit(x))
            return z

    def _explicit(self, x):
        """The cell as a function of z and of its parameters and x (for exact second derivatives
        through backward="implicit"), built only where the adjoint Function is used."""
        return lambda: ExplicitF(self.cell, x, has_x=True)

    def _warn_plain_dropout(self) -> None:
        """Warn once if the cell holds a torch.nn dropout in training mode: it draws a new mask at
        every call of the cell, so f changes between iterations and the solve cannot converge.
        Looked for at the first forward in training mode only (one walk over the cell's modules)."""
        self._warned_plain_dropout = True
        for name, mod in self.cell.named_modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
                _checks.warn(f"deqfast.DEQ: the cell holds {type(mod).__name__}(p={mod.p}) at "
                             f"{('cell.' + name) if name else 'cell'}, which draws a new mask at every call of the "
                             f"cell, so the solve cannot converge in training mode (layer.stats will show it); "
                             f"use deqfast.VariationalDropout(p), whose mask is kept during the solve",
                             UserWarning)
                return

    def _graphs_keepable(self, x, z0) -> bool:
        """Whether the forward solve's graphs can be kept across calls (see the class docstring)."""
        xs = [x] if isinstance(x, torch.Tensor) else x
        return (isinstance(_first(z0), torch.Tensor) and _graph.supported(_first(z0)) and isinstance(self.cell, nn.Module)
                and type(xs) in (list, tuple) and all(isinstance(t, torch.Tensor) for t in xs)
                and not (self.options.backward == "bptt" and torch.is_grad_enabled())  # recorded: no graphs
                and not torch.compiler.is_compiling()  # traced: the solver runs eagerly, no graphs
                and not (self.training and any(isinstance(mod, VariationalDropout) and mod.p > 0
                                               for mod in self.cell.modules())))  # a new mask each forward

    def _graph_key(self, xs, z0) -> tuple:
        zs = z0 if isinstance(z0, (list, tuple)) else [z0]
        device = _first(z0).device.type
        return (
            type(z0), tuple((tuple(t.shape), t.dtype, t.device) for t in zs),
            tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in xs),
            self.options, tuple(mod.training for mod in self.cell.modules()),
            torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), torch.is_inference_mode_enabled(),
            tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
                  for t in itertools.chain(self.cell.parameters(), self.cell.buffers())),
        )

    def _graphed_forward(self, x, z0, norms=None):
        """The solve with the cell reading static copies of x, and the graphs of the last solve
        with the same key replayed (captured on the first)."""
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        key = self._graph_key(xs, z0)
        kept = self._graphs.pop(key, None) or _KeptGraphs(xs)
        self._graphs[key] = kept  # the most recently used last
        while len(self._graphs) > self.graph_cache_size:
            self._graphs.popitem(last=False)
        with torch.no_grad():
            for static, t in zip(kept.xs, xs):
                static.copy_(t)
        x_static = kept.xs[0] if isinstance(x, torch.Tensor) else type(x)(kept.xs)
        solving = [True]

        def f(z):  # the solver's iterations read the static x; f at z* (autograd) the caller's x
            return self.cell(z, x_static if solving[0] else x)

        def solver_done(_stats):
            solving[0] = False
            if norms:
                norms.release(_stats)

        before = kept.graphs.captures
        with _graph.reuse(kept.graphs), _no_autocast_cache(_first(z0).device.type):
            z, self.stats = solve(f, z0, self.options, caller="deqfast.DEQ", after_solver=solver_done,
                                  explicit=self._explicit(x))
        self.graph_captures += kept.graphs.captures - before
        return z

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_graphs"] = collections.OrderedDict()  # CUDA graphs are neither copied nor pickled
        state["_dropout_users"] = {}  # nor references to modules outside the layer
        return state

    def _compact_forward(self, x, z0, norms=None):
        """The solve with the cell evaluated on the samples still active at the last host check.

        Each call gathers those samples' rows of z and x, calls the cell on them and scatters the
        result; a finished sample (frozen by the solver, its f-value unused) gets its own z back.
        f at z* (the differentiable step) and the backward use the whole batch."""
        caller = "deqfast.DEQ (compact=True)"
        B = (z0[0] if isinstance(z0, (list, tuple)) and z0 else z0).shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != B:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{caller}: x must be a tensor with the batch ({B} samples) on dim 0, to be gathered "
                            f"with the active samples; got {got}. Use compact=False for other inputs")
        dropout_error = ValueError(f"{caller}: a VariationalDropout in the cell keeps one mask per sample of the "
                                   f"whole batch, which compaction cannot gather; use compact=False in training")
        if self.training and isinstance(self.cell, nn.Module) and any(
                isinstance(mod, VariationalDropout) and mod.p > 0 for mod in self.cell.modules()):
            raise dropout_error
        if isinstance(self.cell, nn.Module):
            for name, mod in self.cell.named_modules():
                # batch statistics: training mode, or no running statistics to use in eval
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or mod.running_mean is None):
                    raise ValueError(
                        f"{caller}: the cell's {type(mod).__name__} at {('cell.' + name) if name else 'cell'} "
                        f"normalises with the statistics of the whole batch, so the samples are coupled and the "
                        f"active ones alone would be normalised differently (a silently different f); use "
                        f"compact=False, or a per-sample norm (GroupNorm, LayerNorm) or that layer in eval mode")
        active = _active.ActiveSet()
        evaluated = [0]
        solving = [True]
        # Anderson writes every sample's f-value into its history at every step, frozen samples
        # included, and backward_warm_start builds its secant pairs from that history: a finished
        # sample must get its true f(z*) there, not z* (a false zero residual). Its frozen z* is
        # where f was last evaluated for it (unless it failed), so that value is kept and handed back.
        keep = self.options.backward_warm_start and self.options.solver == "anderson" and torch.is_grad_enabled()
        last = [None]  # keep: (z parts, f parts) of each sample's last real evaluation

        def cell(z, x):  # a solve nested in the cell must not publish its samples to this one's set
            with _active.hidden():
                return self.cell(z, x)

        def f(z):
            index = active.index if solving[0] else None
            if index is None:
                evaluated[0] += B
                out = cell(z, x)
                if keep and solving[0]:
                    last[0] = (_parts(z), _parts(out))
                return out
            evaluated[0] += int(index.numel())
            if self._dropout_users:  # a cell that is not a module applied a mask on the whole batch
                raise dropout_error
            parts = _parts(z)
            inputs = [part.index_select(0, index) for part in parts]
            out = _parts(cell(type(z)(inputs) if isinstance(z, (list, tuple)) else inputs[0], x.index_select(0, index)))
            base = parts
            if keep:
                last_z, last_f = last[0]
                same = torch.stack([(a == b).reshape(B, -1).all(dim=1) for a, b in zip(parts, last_z)]).all(dim=0)
                base = [torch.where(same.view(-1, *[1] * (part.dim() - 1)), lf, part) for part, lf in zip(parts, last_f)]
                last[0] = ([lz.index_copy(0, index, i) for lz, i in zip(last_z, inputs)],
                           [lf.index_copy(0, index, o) for lf, o in zip(last_f, out)])
            result = [part.index_copy(0, index, o) for part, o in zip(base, out)]
            return type(z)(result) if isinstance(z, (list, tuple)) else result[0]

        def solver_done(_stats):
            solving[0] = False
            if norms:
                norms.release(_stats)

        with _active.track(active):
            z, self.stats = solve(f, z0, self.options, caller="deqfast.DEQ", after_solver=solver_done,
                                  explicit=self._explicit(x))
        self.rows_evaluated = evaluated[0]
        return z

    def extra_repr(self) -> str:
        o = self.options
        return f"solver={o.solver!r}, max_iter={o.max_iter}, tol={o.tol}, backward={o.backward!r}"


class _RunningStats:
    """The cell's batch-norm layers (``torch.nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy ones) in training mode with running statistics: while the solver
    iterates they normalise with the batch's statistics as always but do not update their running
    statistics (nor ``num_batches_tracked``), which would otherwise take one momentum step per
    solver iteration, mostly from iterates far from the equilibrium (z0 = 0 first). ``release``
    (after the solve) turns the updates back on, so the evaluation at the equilibrium, f(z*),
    updates them: once per forward (implicit, neumann, jfb; phantom: once per phantom step).

    Done by setting ``track_running_stats`` to False during the solve (a module's forward reads
    it at each call); a context manager, so it is restored if the solve raises. Falsy when the
    cell holds no such layer (a cell that is not a module: none found). A lazy batch norm is left
    alone at its first forward, which creates its running statistics."""

    def __init__(self, cell, modules=None):
        """``modules``: ``list(cell.modules())`` if the caller has it already."""
        if modules is None and isinstance(cell, nn.Module):
            modules = cell.modules()
        self.modules = [mod for mod in modules if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                        and mod.training and mod.track_running_stats and not _uninitialized(mod)] \
            if isinstance(cell, nn.Module) else []

    def __bool__(self) -> bool:
        return bool(self.modules)

    def __enter__(self):
        for mod in self.modules:
            mod.track_running_stats = False
        return self

    def release(self, _stats=None) -> None:
        for mod in self.modules:
            mod.track_running_stats = True
        self.modules = []

    def __exit__(self, *exc):
        self.release()
        return False


def _uninitialized(mod: nn.Module) -> bool:
    """A lazy module (LazyBatchNorm2d, ...) before its first call: it creates its running statistics
    at that call only if track_running_stats is on, so it is left alone for that forward."""
    return isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params()


def _parts(z):
    """The tensors of a state (or of a cell's output): a list of one tensor, or of the list/tuple's."""
    return list(z) if isinstance(z, (list, tuple)) else [z]


def _batch_mismatch(x, z0) -> str:
    """'z0 has batch size 4 (dim 0), x has 8' where both are known and differ (x of batch 1 broadcasts)."""
    xb, zb = _first(x), _first(z0)
    if not (isinstance(xb, torch.Tensor) and isinstance(zb, torch.Tensor) and xb.dim() > 0 and zb.dim() > 0):
        return ""
    if xb.shape[0] in (zb.shape[0], 1):
        return ""
    return f"z0 has batch size {zb.shape[0]} (dim 0), x has {xb.shape[0]}"


def _first(z0):
    """The (first) tensor of a state z0: a tensor or a list/tuple of them."""
    return z0[0] if isinstance(z0, (list, tuple)) and z0 else z0


def _no_autocast_cache(device: str):
    """Autocast as it is, without its cache of cast weights: the cache is emptied when the caller's
    autocast region ends, and a graph that read a cached cast would read freed memory at the next
    call (torch.cuda.make_graphed_callables asks for cache_enabled=False for the same reason)."""
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)


class _KeptGraphs:
    """What a DEQ(cuda_graph=True) keeps per key: static copies of the call's x, which the cell
    reads during the solve, and the solver's buffers and graphs (:class:`_graph.BlockGraphs`)."""

    def __init__(self, xs):
        with torch.no_grad():
            self.xs = [torch.empty_like(t) for t in xs]
        self.graphs = _graph.BlockGraphs()
