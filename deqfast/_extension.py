"""Loading the compiled extension deqfast._C, never breaking ``import deqfast``."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch  # noqa: F401  (torch must be imported before _C is loaded)

_state = {"module": None, "reason": None, "loaded": False}


def load_extension():
    """Load deqfast._C once (registering torch.ops.deqfast.*); None when absent, disabled or broken."""
    if _state["loaded"]:
        return _state["module"]
    _state["loaded"] = True
    if os.environ.get("DEQFAST_DISABLE_EXTENSION", "") not in ("", "0"):
        _state["reason"] = "disabled by DEQFAST_DISABLE_EXTENSION=1; the pure-PyTorch reference is used"
        return None
    if importlib.util.find_spec("deqfast._C") is None:
        _state["reason"] = "deqfast._C is not built in this install; the pure-PyTorch reference is used"
        return None
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # a broken build must not break import deqfast
        _state["reason"] = f"deqfast._C failed to load ({type(exc).__name__}: {exc}); the pure-PyTorch reference is used"
        warnings.warn(f"deqfast: {_state['reason']}", RuntimeWarning, stacklevel=3)
        return None
    from . import _fake

    _fake.register()
    _state["module"] = _C
    _state["reason"] = "loaded: fused ops for " + ("CPU and CUDA" if _C.has_cuda() else "CPU")
    return _C


def extension_info() -> dict:
    """{"compiled": bool, "cuda": bool, "reason": str}: whether fused ops are in use and why not."""
    module = load_extension()
    cuda = bool(module is not None and getattr(module, "has_cuda", lambda: False)())
    return {"compiled": module is not None, "cuda": cuda, "reason": _state["reason"]}


def fused_available(device: torch.device) -> bool:
    """Whether the fused ops are compiled for ``device`` (and the extension is enabled)."""
    module = load_extension()
    if module is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(module.has_cuda())
