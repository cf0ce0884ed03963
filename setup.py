"""Build of deqfast.

Today deqfast is pure Python on top of the installed torch; the fused C++/CUDA extension
deqfast._C arrives with the kernels (see csrc/). Install against the torch you already have:

    pip install --no-build-isolation -e .
"""
from setuptools import setup

setup()
