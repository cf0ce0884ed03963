"""Build of deqfast and its compiled extension deqfast._C.

Build against the torch you already have (an isolated build env would pull another multi-GB torch):

    pip install torch && pip install --no-build-isolation -e .

What is compiled, printed at build time:
- the C++ ops (csrc/ops.cpp, csrc/cpu/): always;
- the CUDA kernels (csrc/cuda/): when torch has CUDA and nvcc is found, or DEQFAST_FORCE_CUDA=1
  (an error on a CPU-only torch); DEQFAST_CPU_ONLY=1 skips them.
MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured (default archs "8.0;9.0+PTX" when no GPU is visible,
since torch cannot guess them then).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    # /usr/local/bin/nvcc can be a wrapper script: torch would then guess CUDA_HOME=/usr/local.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "deqfast: building the extension needs torch installed first, then "
            "`pip install --no-build-isolation .` (got: %s)" % exc
        )

    force_cuda, cpu_only = _flag("DEQFAST_FORCE_CUDA"), _flag("DEQFAST_CPU_ONLY")
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError(
            "deqfast: DEQFAST_FORCE_CUDA=1 but this torch (%s) is a CPU-only build" % torch.__version__
        )
    with_cuda = not cpu_only and torch.version.cuda is not None and (force_cuda or cuda_home is not None)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template over `#pragma omp parallel` (the torch wheels use
        # OpenMP): without -fopenmp our CPU kernels would silently run on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc = ["-O3", "-lineinfo"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DDEQFAST_WITH_CUDA")
        nvcc.append("-DDEQFAST_WITH_CUDA")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    reason = (
        "DEQFAST_CPU_ONLY=1" if cpu_only else
        "torch %s has no CUDA" % torch.__version__ if torch.version.cuda is None else
        "nvcc not found (set CUDA_HOME)" if not with_cuda else
        "CUDA %s at %s, archs %s" % (torch.version.cuda, os.environ.get("CUDA_HOME"), os.environ.get("TORCH_CUDA_ARCH_LIST", "auto"))
    )
    print("deqfast setup: building deqfast._C with CPU%s (%s), MAX_JOBS=%s"
          % (" + CUDA" if with_cuda else " only", reason, os.environ.get("MAX_JOBS", "auto")))
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        name="deqfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
