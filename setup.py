"""Packaging entry for the optional ahead-of-time build of the C++/CUDA backends.

Plain installs build nothing: the compiled backends are built with ninja on first use, from the
C++ sources, which a wheel carries as ``lbw_kernels/csrc`` (a checkout uses ``csrc/``).
Set LBW_GUARD_BUILD_EXT=1 (and install with --no-build-isolation, so the installed torch
is used) to compile them now instead.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Copy ``csrc/`` into the wheel's ``lbw_kernels/`` for the on-demand build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # editable installs read csrc/ in place
            return
        dest = os.path.join(self.build_lib, "lbw_kernels", "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dest)


def _extensions():
    if os.environ.get("LBW_GUARD_BUILD_EXT", "0") in ("", "0"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    from lbw_kernels._build import get_extensions

    return {"ext_modules": get_extensions(), "cmdclass": {"build_ext": BuildExtension}}


def _setup_kwargs():
    kwargs = _extensions()
    kwargs["cmdclass"] = {**kwargs.get("cmdclass", {}), "build_py": BuildPyWithSources}
    return kwargs


setup(**_setup_kwargs())
