"""Builds easgd_ext and its native module easgd_ext._C with CMake (see CMakeLists.txt).

Environment knobs (read by CMakeLists.txt):
  EASGD_EXT_CUDA=1|0       force the CUDA kernels on (a missing nvcc is then an error) or off;
                           unset: built when nvcc is found (PATH, CUDACXX or CUDA_HOME).
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0+PTX"; default: sm_80, sm_90 and compute_90 PTX.
  CUDA_HOME                toolkit to use when CUDACXX is not set.
  EASGD_EXT_CMAKE_ARGS     extra arguments for the CMake configure step.
  MAX_JOBS                 parallel compile jobs (default: all cores).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake_executable() -> str:
    """The pip-installed cmake (a pinned, known version) if present, else the one on PATH."""
    try:
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            raise RuntimeError("easgd_ext needs CMake >= 3.24 to build: pip install cmake") from None
        return found


def _ninja_args() -> list[str]:
    try:
        import ninja  # type: ignore[import-not-found]

        return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
    except ImportError:
        return ["-G", "Ninja"] if shutil.which("ninja") else []


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_executable()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), *_ninja_args(),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            *shlex.split(os.environ.get("EASGD_EXT_CMAKE_ARGS", "")),
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("easgd_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
