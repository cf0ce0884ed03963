"""Loading the compiled extension deqfast._C, never breaking ``import deqfast``."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch  # noqa: F401  (torch must be imported before _C is loaded)

_state = {"module": None, "reason": None, "loaded": False}
# CUDA device index -> "" when deqfast's kernels run on it, else why not (asked once per device).
_cuda_devices: dict = {}


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
    """{"compiled": bool, "cuda": bool, "reason": str, "cuda_devices": {index: reason}}: whether
    fused ops are in use and why not. ``cuda_devices`` lists the CUDA devices used so far whose
    architecture the kernels were not compiled for (they run the reference), with the reason."""
    module = load_extension()
    cuda = bool(module is not None and getattr(module, "has_cuda", lambda: False)())
    unusable = {index: reason for index, reason in _cuda_devices.items() if reason}
    return {"compiled": module is not None, "cuda": cuda, "reason": _state["reason"], "cuda_devices": unusable}


def cuda_kernel_status(module, index: int) -> str:
    """"" when deqfast's CUDA kernels have an image for device ``index``, else the reason (cached)."""
    if index not in _cuda_devices:
        check = getattr(module, "cuda_kernel_status", None)
        reason = "" if check is None else str(check(index))
        if reason:
            warnings.warn(f"deqfast: {reason}; the pure-PyTorch reference is used on that device", RuntimeWarning,
                          stacklevel=4)
        _cuda_devices[index] = reason
    return _cuda_devices[index]


def fused_available(device: torch.device) -> bool:
    """Whether the fused ops are compiled for ``device`` (and the extension is enabled): on CUDA, for
    its architecture too (else the reference is used, and extension_info() says why)."""
    module = load_extension()
    if module is None:
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not module.has_cuda():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return not cuda_kernel_status(module, index)
