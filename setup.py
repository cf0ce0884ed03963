"""Build of deqfast and its compiled extension deqfast._C.

Build against the torch you already have (an isolated build env would pull another multi-GB torch):

    pip install torch && pip install --no-build-isolation -e .

What is compiled, said in one line at build time (pip shows it with -v, or when the build fails):
- the C++ ops (csrc/ops.cpp, csrc/cpu/): always;
- the CUDA kernels (csrc/cuda/): when torch has CUDA and nvcc is found, or DEQFAST_FORCE_CUDA=1
  (an error on a CPU-only torch); DEQFAST_CPU_ONLY=1 skips them. An nvcc whose major version differs
  from torch's CUDA stops the build with a message that says both versions and the two ways out.
MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured (default archs "8.0;9.0+PTX" when no GPU is visible,
since torch cannot guess them then).

The compiled extension is tied to the torch it was built against: a wheel (or an install) requires
torch==<that torch's major.minor>.*; only a source distribution keeps the loose torch>=2.1.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _check_setuptools():
    """pyproject.toml's license = "MIT" (an SPDX expression, PEP 639) needs setuptools >= 77; older
    ones fail with "`project.license` must be valid exactly by one definition (2 matches found)".
    A build without isolation uses the environment's setuptools, and a Python 3.11 venv comes with
    65.5, which `pip install setuptools` keeps (torch >= 2.13 requires >= 77.0.3; earlier torch
    allows older ones): stop with what to do instead."""
    try:
        major = int(setuptools.__version__.split(".")[0])
    except ValueError:
        return
    if major < 77:
        sys.exit(
            "deqfast setup: this build needs setuptools >= 77 (pyproject.toml's SPDX license field), but "
            "setuptools %s is installed here (%s). Upgrade it in this environment, then rerun the install: "
            "pip install -U \"setuptools>=77\" (torch < 2.13 asks for setuptools < 82: "
            "\"setuptools>=77,<82\" satisfies both)." % (setuptools.__version__, os.path.dirname(setuptools.__file__)))


_check_setuptools()


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


def _nvcc_version(cuda_home):
    """(path, (major, minor)) of <cuda_home>/bin/nvcc (else nvcc on PATH); the version is None when
    nvcc cannot be run or says none; (None, None) without an nvcc."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    nvcc = nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")
    if not nvcc:
        return None, None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return nvcc, None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return nvcc, ((int(match.group(1)), int(match.group(2))) if match else None)


def _torch_requirement():
    """torch==<major.minor>.* of the torch this build compiles against (the extension's ABI is
    that torch's); torch>=2.1 for a source distribution, which is compiled where it is installed."""
    if "sdist" in sys.argv:
        return "torch>=2.1"
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return "torch==%s.%s.*" % (major, minor)


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
    nvcc_path, nvcc_version = _nvcc_version(cuda_home) if with_cuda else (None, None)
    if with_cuda and nvcc_version is not None and str(nvcc_version[0]) != torch.version.cuda.split(".")[0]:
        sys.exit(
            "deqfast setup: %s is CUDA %d.%d but torch %s was built with CUDA %s: the major versions must match "
            "to compile the CUDA kernels. Either install the CUDA %s.x toolkit (and point CUDA_HOME at it), or "
            "build the CPU ops only: DEQFAST_CPU_ONLY=1 pip install --no-build-isolation ."
            % (nvcc_path, nvcc_version[0], nvcc_version[1], torch.__version__, torch.version.cuda,
               torch.version.cuda.split(".")[0]))
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
    if cpu_only:
        what = "CPU ops only, because DEQFAST_CPU_ONLY=1"
    elif torch.version.cuda is None:
        what = "CPU ops only, because torch %s has no CUDA" % torch.__version__
    elif not with_cuda:
        what = ("CPU ops only, because torch %s has CUDA %s but no nvcc was found (install the CUDA %s.x toolkit "
                "and set CUDA_HOME for the GPU kernels; DEQFAST_CPU_ONLY=1 to choose CPU only)"
                % (torch.__version__, torch.version.cuda, torch.version.cuda.split(".")[0]))
    else:
        what = "CPU ops + CUDA kernels for archs %s, because torch %s has CUDA %s and nvcc %s was found at %s" % (
            os.environ.get("TORCH_CUDA_ARCH_LIST", "of the visible GPUs"), torch.__version__, torch.version.cuda,
            "%d.%d" % nvcc_version if nvcc_version else "(version unknown)", nvcc_path or os.environ.get("CUDA_HOME"))
    print("deqfast setup: building deqfast._C with %s; MAX_JOBS=%s" % (what, os.environ.get("MAX_JOBS", "auto")),
          flush=True)
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
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=[_torch_requirement()])
