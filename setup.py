"""Packaging entry for the optional ahead-of-time build of the C++/CUDA backends.

Plain installs build nothing: the compiled backends are built with ninja on first use.
Set LBW_GUARD_BUILD_EXT=1 (and install with --no-build-isolation, so the installed torch
is used) to compile them now instead.
"""

import os

from setuptools import setup


def _extensions():
    if os.environ.get("LBW_GUARD_BUILD_EXT", "0") in ("", "0"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    from lbw_kernels._build import get_extensions

    return {"ext_modules": get_extensions(), "cmdclass": {"build_ext": BuildExtension}}


setup(**_extensions())
