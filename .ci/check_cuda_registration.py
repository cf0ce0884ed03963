"""Load a CUDA build of deqfast._C (no GPU needed) and check every op has a CUDA kernel."""
import glob
import importlib.util
import sys

import torch

lib = sys.argv[1]
path = glob.glob(f"{lib}/deqfast/_C*.so")
assert path, f"no deqfast/_C*.so under {lib}"
spec = importlib.util.spec_from_file_location("deqfast._C", path[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
print("CUDA build:", info)
assert info["cuda"], "the CUDA backend is not compiled in"
missing = [op for op in ("anderson_history", "anderson_step", "anderson_fused_step", "fixed_point_step",
                          "broyden_direction", "broyden_update", "broyden_fused_step")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"deqfast::{op}", "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print("CUDA kernels registered for every op")
