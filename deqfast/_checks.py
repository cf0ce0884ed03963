"""Argument validation: every error names the argument, what was expected and what came."""
from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
import types
import warnings
from typing import Iterable

import torch

SOLVERS = ("anderson", "fixed_point", "broyden")
BACKWARDS = ("implicit", "neumann", "jfb", "phantom", "bptt")
BACKWARD_SOLVERS = ("fixed_point", "anderson", "broyden")
STOP_MODES = ("rel", "abs")


def check_choice(caller: str, name: str, value, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


def check_int(caller: str, name: str, value, minimum: int) -> int:
    """The value as a Python int (numpy's integers and other numbers.Integral are accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{caller}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(caller: str, name: str, value, *, minimum: float = 0.0) -> float:
    """The value as a Python float (numpy's floats, Fraction and other numbers.Real are accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{caller}: {name} must be a real number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{caller}: {name} must be >= {minimum}, got {value}")
    return float(value)


def check_positive(caller: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{caller}: {name} must be a real number > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"{caller}: {name} must be > 0, got {value}")
    return float(value)


class OverRelaxation(float):
    """A damping factor above 1 that deqfast.compat passes on for torchdeq's ``tau > 1``
    (over-relaxation, which torchdeq accepts): check_damping takes any finite value > 0 of this
    type. deqfast's own API keeps tau in (0, 1]."""


def check_damping(caller: str, name: str, value) -> float:
    if isinstance(value, OverRelaxation) and 0.0 < value < math.inf:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < value <= 1.0):
        raise ValueError(f"{caller}: {name} must be in (0, 1], got {value!r}")
    return float(value)


def check_check_every(caller: str, value):
    return None if value is None else check_int(caller, "check_every", value, 1)


def check_bool(caller: str, name: str, value, meaning: str = "") -> bool:
    """The value as a Python bool: a bool, or numpy's bool (a flag read from an array or config).
    ``meaning``, if given, is shown in parentheses after "a bool" in the error."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")
    if not (isinstance(value, bool) or numpy_bool):
        about = f" ({meaning})" if meaning else ""
        raise TypeError(f"{caller}: {name} must be a bool{about}, got {type(value).__name__} {value!r}")
    return bool(value)


_compiler = getattr(torch, "compiler", None)
_compiler_disable = getattr(_compiler, "disable", lambda fn: fn)  # torch < 2.1: as is
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)

STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def eager_under_compile(fn=None, *, recursive: bool = True):
    """Mark a solver step helper that takes the iteration's slot/count as Python ints so that
    torch.compile runs it eagerly instead of compiling it. The solver loop is never traced whole
    (its host checks are graph breaks), so dynamo compiles such helpers frame by frame, and an int
    guard (``slot == 2``) recompiled them at every iteration up to dynamo's recompile limit, with a
    warning, for nothing: they then ran eagerly anyway. ``recursive=True``: ``torch.compiler.disable``
    (the functions fn calls too; about 0.6 µs a call). ``recursive=False``: fn's own frame only,
    with no wrapper and no cost per call, for op wrappers that call no Python function."""
    if fn is None:
        return lambda f: eager_under_compile(f, recursive=recursive)
    if recursive:
        return _compiler_disable(fn)
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # pragma: no cover - a torch without it: disable, with its wrapper
        return _compiler_disable(fn)
    return skip(fn)


def in_func_transform(t: torch.Tensor) -> bool:
    """Whether t is a tensor of a torch.func transform (vmap's BatchedTensor; grad, jacrev, jvp's
    GradTrackingTensor) or of autograd's batched gradients (is_grads_batched=True, jacobian(vectorize=True):
    the legacy BatchedTensor): the solvers' in-place buffers and fused ops have no batching rules."""
    if _is_compiling():
        return _in_func_transform_eagerly(t)
    functorch = torch._C._functorch
    return bool(functorch.is_batchedtensor(t) or functorch.is_gradtrackingtensor(t) or _is_legacy_batched(t))


@_compiler_disable
def _in_func_transform_eagerly(t: torch.Tensor) -> bool:
    """in_func_transform run eagerly under torch.compile: dynamo cannot trace is_gradtrackingtensor
    (it broke the graph there anyway, and warned "Dynamo does not know how to trace the builtin" at
    every compile)."""
    functorch = torch._C._functorch
    return bool(functorch.is_batchedtensor(t) or functorch.is_gradtrackingtensor(t) or _is_legacy_batched(t))


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def jvp_level():
    """1 when the one torch.func transform active is torch.func.jvp (its tensors are then wrapped at
    level 1 and carry forward-mode tangents, which fixed_point and DEQ handle), else None."""
    if _is_compiling():
        return None
    functorch = torch._C._functorch
    top = functorch.peek_interpreter_stack()
    if top is None or top.level() != 1 or top.key() != functorch.TransformType.Jvp:
        return None
    return 1


def unwrap_jvp(t):
    """t's value under torch.func.jvp (the tensor its level-1 wrapper holds); t itself elsewhere."""
    if isinstance(t, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(t):
        return torch._C._functorch._unwrap_for_grad(t, 1)
    return t


def check_not_in_func_transform(caller: str, name: str, t: torch.Tensor) -> None:
    if in_func_transform(t) and not (jvp_level() is not None and not torch._C._functorch.is_batchedtensor(t)):
        raise RuntimeError(
            f"{caller}: {name} is a tensor of a torch.func transform (vmap, grad, jacrev, nested transforms, ...), "
            f"which deqfast does not support (torch.func.jvp alone is, and torch.autograd.forward_ad); call deqfast "
            f"outside the transform (it already solves a whole batch along dim 0, and its backward modes give the "
            f"gradients)"
        )


def conversion_hint(value, name: str) -> str:
    """'; convert it ...' for a numpy array (or another array-like) given where a tensor is expected."""
    if hasattr(value, "__array__") or isinstance(value, numbers.Number):
        return f"; convert it with torch.as_tensor({name}, dtype=torch.float32)"
    if isinstance(value, dict):
        return (f"; a state of several tensors is a list or tuple of them (e.g. list({name}.values()), and f "
                f"takes and returns the same list), not a dict")
    return ""


def complex_hint(t: torch.Tensor, name: str) -> str:
    """'; ...' for a complex tensor given as a state: the solvers work on real tensors."""
    if not t.is_complex():
        return ""
    return (f" (the solvers' norms and mixing are real); solve its real view instead: {name} = "
            f"torch.view_as_real(...) (a real tensor with a last dimension of 2), and f converting with "
            f"torch.view_as_complex(z) on entry and torch.view_as_real(...) on return")


def check_z0(caller: str, z0, name: str = "z0") -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(z0).__name__}{conversion_hint(z0, name)}")
    check_not_in_func_transform(caller, name, z0)
    if z0.layout != torch.strided:
        raise TypeError(f"{caller}: {name} must be a dense (strided) tensor, got layout {z0.layout}; "
                        f"convert it with {name}.to_dense()")
    if not z0.is_floating_point():
        raise TypeError(f"{caller}: {name} must be floating point, got {z0.dtype}{complex_hint(z0, name)}")
    if z0.dtype not in STATE_DTYPES:
        raise TypeError(f"{caller}: {name} must be float16, bfloat16, float32 or float64, got {z0.dtype} "
                        f"(the solver's arithmetic is not defined for it); cast {name} and f's output")
    if z0.device.type == "meta":
        raise ValueError(f"{caller}: {name} must be on a device with data (cpu, cuda, ...), got a meta tensor, "
                         f"which has a shape but no values to iterate on")
    if z0.dim() < 1:
        raise ValueError(f"{caller}: {name} must have a batch dimension (dim 0), got a 0-dim tensor")


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know
        return False


def f_output(caller: str, out, like: torch.Tensor, what: str = "f(z)", like_name: str = "z0") -> torch.Tensor:
    """Check what f returned against z0 (``like``, named ``like_name``) and return it in z0's dtype.

    Under ``torch.autocast`` for z0's device, f may return another floating dtype (its matmuls run
    in the autocast dtype): the solver state stays in z0's dtype and f's output is cast to it, a
    differentiable cast. Outside autocast a different dtype is an error."""
    if not isinstance(out, torch.Tensor):
        hint = ""
        if isinstance(out, (list, tuple)):
            hint = (f"; return the new state alone (a list/tuple is for a state of several tensors, given "
                    f"as a list/tuple {like_name})")
        raise TypeError(f"{caller}: {what} must return a torch.Tensor like {like_name}, got {type(out).__name__}{hint}")
    check_not_in_func_transform(caller, f"{what}'s output", out)
    if out.shape != like.shape:
        raise ValueError(f"{caller}: {what} must return shape {tuple(like.shape)} (the shape of {like_name}), got {tuple(out.shape)}")
    if out.device != like.device:
        raise ValueError(f"{caller}: {what} must return a tensor on {like.device} (the device of {like_name}), got {out.device}")
    if out.dtype != like.dtype:
        if out.is_floating_point() and _autocast_on(like.device):
            return out.to(like.dtype)
        raise TypeError(f"{caller}: {what} must return dtype {like.dtype} (the dtype of {like_name}), got {out.dtype}"
                        + ("; for a complex state return torch.view_as_real(...) of it (z0 its real view)"
                           if out.is_complex() else ""))
    return out


@_compiler_disable
def _version_eagerly(z: torch.Tensor) -> int:
    """z's version counter, read outside dynamo: traced into the frame around f(z), the read kept
    the value of its first compile, so a later z with another counter (a z0 written in place
    before) was taken for f writing into z. Used only while compiling (the disabled function's
    wrapper costs ~0.6 µs a call; eager solves read the attribute)."""
    return z._version


def call_f(caller: str, f, z: torch.Tensor, like: torch.Tensor, like_name: str = "z0") -> torch.Tensor:
    """f(z) checked by :func:`f_output`, and checked not to have written into z: the solver's
    iterate (and its history) would silently change under it.

    The check is z's version counter. Inference tensors (a solve under torch.inference_mode) keep
    none, so f then gets a normal copy of z made outside inference mode, whose counter in-place ops
    still bump: one copy of z (B·d elements) per f call, no host synchronisation, exact (any
    in-place write is caught, and the solver's own iterate is never the tensor written)."""
    if z.is_inference():
        with torch.inference_mode(False):
            z = z.clone()
    compiling = _is_compiling()  # (eager: the plain attribute, no wrapper on the hot path)
    version = _version_eagerly(z) if compiling else z._version
    out = f(z)
    if (_version_eagerly(z) if compiling else z._version) != version:
        raise RuntimeError(
            f"{caller}: f modified its argument z in place (e.g. torch.relu_ or nn.ReLU(inplace=True) "
            f"applied to z), which would corrupt the solver's iterate; use out-of-place operations on z"
        )
    return f_output(caller, out, like, like_name=like_name)


def check_callable(caller: str, name: str, f) -> None:
    if not callable(f):
        raise TypeError(f"{caller}: {name} must be callable, got {type(f).__name__}")


def check_arguments(caller: str, name: str, f, expected: str, nargs: int, fix: str) -> None:
    """Raise a TypeError naming the fix when f (callable) cannot take ``nargs`` positional
    arguments: a cell f(z) given to DEQ (which calls cell(z, x)), a cell f(z, x) given to
    fixed_point (which calls f(z)), or a class given where an instance was meant. Silent where
    the signature cannot be read (builtins), and under torch.compile (not traced)."""
    if _is_compiling():
        return
    if isinstance(f, type):
        raise TypeError(f"{caller}: {name} must be {expected}, got the class {f.__name__} itself; "
                        f"pass an instance, e.g. {f.__name__}(...)")
    target = f
    if isinstance(f, torch.nn.Module) and type(f).__call__ is torch.nn.Module.__call__:
        target = f.forward  # Module.__call__ is (*args, **kwargs); forward says what it takes
    key = _arguments_key(target, nargs)
    if key is not None and key in _ARGUMENTS_OK:
        return
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (a builtin, some C callables)
        return
    try:
        signature.bind(*range(nargs))
    except TypeError:
        if target is not f:
            what = f"{type(f).__name__}, whose forward takes {signature}"
        else:
            what = f"{getattr(f, '__name__', type(f).__name__)}, which takes {signature}"
        raise TypeError(f"{caller}: {name} must be {expected}, got {what}; {fix}") from None
    if key is not None:
        if len(_ARGUMENTS_OK) >= 1024:
            _ARGUMENTS_OK.clear()
        _ARGUMENTS_OK.add(key)


# check_arguments' accepted signatures, so that a solve called in a loop (often with a lambda made
# anew at each call) does not read its f's signature each time (inspect.signature: ~10-20 µs).
_ARGUMENTS_OK: set = set()


def _arguments_key(target, nargs: int):
    """What decides whether ``target`` binds ``nargs`` positional arguments, for a plain Python
    function or a method of one: its code (parameters, *args), whether it is bound (self taken), how
    many trailing positional parameters have defaults and which keyword-only ones do. None where
    the signature may come from elsewhere (``__signature__``, ``__wrapped__`` and other attributes
    in the function's __dict__; builtins, partials, callable objects): those are read each time."""
    bound = isinstance(target, types.MethodType)
    fn = target.__func__ if bound else target
    if type(fn) is not types.FunctionType or fn.__dict__:
        return None
    kwdefaults = fn.__kwdefaults__
    return (fn.__code__, bound, len(fn.__defaults__ or ()), tuple(sorted(kwdefaults)) if kwdefaults else (), nargs)


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category=RuntimeWarning) -> None:
    """warnings.warn attributed to the user's line: the first frame outside deqfast and torch
    (DEQ runs under nn.Module.__call__, the adjoint under autograd's engine). Python 3.12's
    skip_file_prefixes does this; on 3.11 the stacklevel is counted here. Where no user frame
    exists (a backward on another thread), the warning points at its deqfast line."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
