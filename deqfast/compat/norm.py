"""torchdeq.norm in deqfast.compat: apply_norm, reset_norm, remove_norm, register_norm,
register_norm_module, and the WeightNorm and SpectralNorm re-parametrisations.

Own code, not a call into torchdeq: a drop-in must run where torchdeq is not installed, and the
parametrisation is short. It follows torchdeq 0.1.0 exactly (parameter names weight_g/weight_v,
weight_orig/weight_u/weight_v, the flags norm_no_scale, norm_target_norm, norm_clip, norm_clip_value,
sn_n_power_iters, the same random draws for the spectral norm's vectors), so checkpoints load either
way; tests/test_compat_namespace.py checks weights and gradients against torchdeq's on the same seeds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parameter import Parameter

from .utils import DEQConfig

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module",
           "WeightNorm", "SpectralNorm"]

_TARGETS = {
    nn.Linear: ("weight", 0), nn.Conv1d: ("weight", 0), nn.Conv2d: ("weight", 0), nn.Conv3d: ("weight", 0),
    nn.ConvTranspose1d: ("weight", 1), nn.ConvTranspose2d: ("weight", 1), nn.ConvTranspose3d: ("weight", 1),
}


def _norm(p: torch.Tensor, dim):
    """The norm of p over every dim but ``dim`` (None: the whole tensor), shaped to broadcast."""
    if dim is None:
        return p.norm()
    if dim == 0:
        return p.contiguous().view(p.size(0), -1).norm(dim=1).view(p.size(0), *([1] * (p.dim() - 1)))
    if dim == p.dim() - 1:
        return p.contiguous().view(-1, p.size(-1)).norm(dim=0).view(*([1] * (p.dim() - 1)), p.size(-1))
    return _norm(p.transpose(0, dim), 0).transpose(0, dim)


def _names_dims(cls, module, names, dims):
    if names is None or dims is None:
        names, dims = cls._target_modules[type(module)]
    names = [names] if isinstance(names, str) else list(names)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(names) != len(dims):
        raise ValueError(f"deqfast.compat.norm: names and dims must have the same length, got {names!r} and {dims!r}")
    return names, dims


def _factor(fn, scale):
    factor = scale
    if fn.clip:
        factor = torch.minimum(fn.clip_value * torch.ones_like(factor), factor)
    return factor


class WeightNorm:
    """W = g · V / ‖V‖ (per output unit: the norm over every dim but ``dim``); g learnable
    (weight_g) or the fixed target_norm (norm_no_scale); with clip, the factor is capped at clip_value."""

    _target_modules = dict(_TARGETS)

    def __init__(self, names, dims, learn_scale=True, target_norm=1.0, clip=False, clip_value=1.0):
        self.names, self.dims = names, dims
        self.learn_scale, self.target_norm, self.clip, self.clip_value = learn_scale, target_norm, clip, clip_value

    def compute_weight(self, module, name, dim):
        weight = getattr(module, name + "_v")
        norm = _norm(weight, dim)
        scale = getattr(module, name + "_g") / norm if self.learn_scale else self.target_norm / norm
        return weight * _factor(self, scale)

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True, target_norm=1.0, clip=False,
              clip_value=1.0):
        names, dims = _names_dims(cls, module, names, dims)
        args = deq_args if deq_args is not None else DEQConfig(None)
        fn = cls(names, dims, not args.get("norm_no_scale", not learn_scale), args.get("norm_target_norm", target_norm),
                 args.get("norm_clip", clip), args.get("norm_clip_value", clip_value))
        for name, dim in zip(names, dims):
            weight = getattr(module, name)
            del module._parameters[name]
            if fn.learn_scale:
                module.register_parameter(name + "_g", Parameter(_norm(weight, dim).data))
            module.register_parameter(name + "_v", Parameter(weight.data))
            setattr(module, name, fn.compute_weight(module, name, dim))
        return fn

    def __call__(self, module):
        for name, dim in zip(self.names, self.dims):
            setattr(module, name, self.compute_weight(module, name, dim))

    def remove(self, module):
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, name, dim)
            delattr(module, name)
            if self.learn_scale:
                del module._parameters[name + "_g"]
            del module._parameters[name + "_v"]
            module.register_parameter(name, Parameter(weight.data))


def _view_back_dim(tensor, shape, dims):
    dims = list(range(len(shape))) if dims is None else ([dims] if isinstance(dims, int) else dims)
    return tensor.reshape([n if i in dims else 1 for i, n in enumerate(shape)])


class SpectralNorm:
    """W = g · W_orig / σ, σ the largest singular value of W_orig (as a matrix with ``dim`` first)
    estimated by n_power_iterations power steps per training-mode reset (vectors weight_u, weight_v);
    g learnable (weight_g, one per output unit) or target_norm; clip caps the factor at clip_value."""

    _target_modules = dict(_TARGETS)

    def __init__(self, names, dims, learn_scale=True, target_norm=1.0, clip=False, clip_value=1.0,
                 n_power_iterations=1, eps=1e-12):
        if n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
        self.names, self.dims = names, dims
        self.learn_scale, self.target_norm, self.clip, self.clip_value = learn_scale, target_norm, clip, clip_value
        self.n_power_iterations, self.eps = n_power_iterations, eps

    @staticmethod
    def _reshape_weight_to_matrix(weight, dim):
        if dim != 0:
            weight = weight.permute(dim, *[d for d in range(weight.dim()) if d != dim])
        return weight.reshape(weight.shape[0], -1)

    def compute_weight(self, module, do_power_iteration, name, dim):
        weight = getattr(module, name + "_orig")
        u, v = getattr(module, name + "_u"), getattr(module, name + "_v")
        mat = self._reshape_weight_to_matrix(weight, dim)
        if do_power_iteration:
            with torch.no_grad():
                for _ in range(self.n_power_iterations):
                    v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps, out=v)
                    u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps, out=u)
                u = u.clone(memory_format=torch.contiguous_format)
                v = v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(mat, v))
        scale = getattr(module, name + "_g") / sigma if self.learn_scale else self.target_norm / sigma
        return weight * _factor(self, scale)

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True, target_norm=1.0, clip=False,
              clip_value=1.0, n_power_iterations=1, eps=1e-12):
        names, dims = _names_dims(cls, module, names, dims)
        args = deq_args if deq_args is not None else DEQConfig(None)
        target_norm = args.get("norm_target_norm", target_norm)
        fn = cls(names, dims, not args.get("norm_no_scale", not learn_scale), target_norm, args.get("norm_clip", clip),
                 args.get("norm_clip_value", clip_value), args.get("sn_n_power_iters", n_power_iterations), eps)
        for name, dim in zip(names, dims):
            weight = module._parameters[name]
            with torch.no_grad():
                h, w = fn._reshape_weight_to_matrix(weight, dim).shape
            u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
            delattr(module, name)
            module.register_parameter(name + "_orig", weight)
            setattr(module, name, weight.data)
            if fn.learn_scale:
                module.register_parameter(name + "_g", Parameter(_view_back_dim(target_norm * torch.ones(h), weight.shape, dim)))
            module.register_buffer(name + "_u", u)
            module.register_buffer(name + "_v", v)
        return fn

    def __call__(self, module):
        for name, dim in zip(self.names, self.dims):
            setattr(module, name, self.compute_weight(module, module.training, name, dim))

    def remove(self, module):
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, False, name, dim)
            for suffix in ("", "_u", "_v") + (("_g",) if self.learn_scale else ()) + ("_orig",):
                delattr(module, name + suffix)
            module.register_parameter(name, Parameter(weight.detach()))


_norm_class = {"weight_norm": WeightNorm, "spectral_norm": SpectralNorm}


def register_norm(norm_type, norm_class):
    """torchdeq.norm.register_norm: make ``norm_class`` available as norm_type."""
    _norm_class[norm_type] = norm_class


def register_norm_module(module_class, norm_type, names="weight", dims=0):
    """torchdeq.norm.register_norm_module: apply norm_type to ``names`` of module_class (norm over ``dims``)."""
    _norm_class[norm_type]._target_modules[module_class] = (names, dims)


def apply_norm(model, norm_type="weight_norm", prefix_filter_out=None, filter_out=None, args=None, **norm_kwargs):
    """torchdeq.norm.apply_norm: re-parametrise the weight of every Linear/Conv/ConvTranspose (and
    registered) module of ``model`` by norm_type ('weight_norm', 'spectral_norm', 'none'), skipping
    modules whose name starts with a prefix_filter_out entry or contains a filter_out entry.
    ``args`` (args.norm_type, norm_no_scale, norm_target_norm, norm_clip, norm_clip_value,
    sn_n_power_iters) wins over the keywords."""
    args = DEQConfig(args)
    args.update(**norm_kwargs)
    norm_type = args.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _norm_class:
        raise ValueError(f"deqfast.compat.apply_norm: norm_type must be one of "
                         f"{', '.join(map(repr, [*_norm_class, 'none']))}, got {norm_type!r}")
    Norm = _norm_class[norm_type]
    prefix_filter_out = [prefix_filter_out] if isinstance(prefix_filter_out, str) else prefix_filter_out
    filter_out = [filter_out] if isinstance(filter_out, str) else filter_out
    for name, module in model.named_modules():
        if prefix_filter_out and any(name.startswith(p) for p in prefix_filter_out):
            continue
        if filter_out and any(s in name for s in filter_out):
            continue
        if type(module) in Norm._target_modules:
            module._deq_norm = Norm.apply(module, deq_args=args, **norm_kwargs)


def reset_norm(model):
    """torchdeq.norm.reset_norm: recompute every normalised weight (a spectral norm's power step in
    training mode); call it once per training step, before the forward."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm(module)


def remove_norm(model):
    """torchdeq.norm.remove_norm: fold the normalisation into plain weight parameters."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm.remove(module)
            del module._deq_norm
