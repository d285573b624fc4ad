"""Builds torch_batchnorm through CMakeLists.txt, the one place that lists its sources.

The compiled pieces land inside the package: ``_C`` (the pybind11 module),
``lib/libtorch_batchnorm.so`` (the ops), and ``include/`` plus ``lib/cmake/`` so that
``torch_batchnorm.cmake_prefix_path`` serves LibTorch programs.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        import torch

        package_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        configure = [
            "cmake",
            str(ROOT),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_INSTALL_PREFIX={package_dir}",
            "-DCMAKE_INSTALL_LIBDIR=lib",
            "-DTBN_BUILD_PYTHON=ON",
            f"-DTBN_WITH_CUDA={os.environ.get('TBN_WITH_CUDA', 'AUTO')}",
        ]
        if os.environ.get("CMAKE_GENERATOR") is None and _has_ninja():
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir)
        subprocess.check_call(["cmake", "--install", "."], cwd=build_dir)
        if self.inplace or getattr(self, "editable_mode", False):
            # Editable installs import the package from the source tree: put the library,
            # headers and CMake files beside it too.
            source_package = ROOT / "python" / "torch_batchnorm"
            subprocess.check_call(["cmake", "--install", ".", "--prefix", str(source_package)], cwd=build_dir)


def _has_ninja():
    from shutil import which

    return which("ninja") is not None


setup(
    ext_modules=[CMakeExtension("torch_batchnorm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
