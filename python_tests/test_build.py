"""The build: what build_info reports, how CUDA architectures are chosen, that a forced CUDA
build without a working nvcc fails loudly, and that the README and CI run the same tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import easgd_ext
from easgd_ext import ops

ROOT = Path(__file__).resolve().parents[1]


def cmake() -> str:
    try:
        import cmake as cmake_pkg

        return str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            pytest.skip("cmake not installed")
        return found


def test_build_info_describes_the_build():
    info = easgd_ext.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["cxx_compiler"]
    assert isinstance(info["openmp"], bool)
    assert info["cpu_isa"] in info["cpu_isas_available"].split(",")
    if info["cuda"]:
        assert info["cuda_compiler"].startswith("nvcc ")
        assert info["cuda_archs"], "a CUDA build lists its architectures"
    else:
        assert info["cuda_archs"] == [] and info["cuda_devices"] == 0


def test_cuda_build_runs_its_cpu_kernels_without_a_gpu():
    """CUDA builds get deployed to CPU hosts: importing and running CPU kernels must work there."""
    info = easgd_ext.build_info()
    if not info["cuda"] or info["cuda_devices"] > 0:
        pytest.skip("needs a CUDA build on a host without a GPU (as in CI)")
    x, c = torch.randn(1000), torch.randn(1000)
    total = x.double() + c.double()
    ops.async_exchange(x, c, 0.5)
    torch.testing.assert_close(x.double() + c.double(), total, rtol=0, atol=1e-5)


ARCH_SCRIPT = """
include("{root}/cmake/CudaArchitectures.cmake")
easgd_ext_cuda_architectures(out)
message(STATUS "ARCHS=${{out}}")
"""


def resolve_archs(tmp_path: Path, arch_list: str | None, cmake_define: str | None = None):
    script = tmp_path / "archs.cmake"
    script.write_text(ARCH_SCRIPT.format(root=ROOT.as_posix()))
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    args = [cmake()] + ([f"-DCMAKE_CUDA_ARCHITECTURES={cmake_define}"] if cmake_define else [])
    proc = subprocess.run(args + ["-P", str(script)], env=env, capture_output=True, text=True)
    match = re.search(r"ARCHS=(.*)", proc.stdout + proc.stderr)
    return proc.returncode, (match.group(1).strip() if match else proc.stderr)


@pytest.mark.parametrize("arch_list,expected", [
    (None, "80-real;90-real;90-virtual"),
    ("9.0", "90-real"),
    ("8.0;9.0+PTX", "80-real;90-real;90-virtual"),
    ("8.0 8.6 9.0", "80-real;86-real;90-real"),
    ("9.0a", "90a-real"),
])
def test_cuda_arch_selection(tmp_path, arch_list, expected):
    code, archs = resolve_archs(tmp_path, arch_list)
    assert code == 0 and archs == expected


def test_explicit_cmake_architectures_win(tmp_path):
    assert resolve_archs(tmp_path, "8.0", cmake_define="90") == (0, "90")


def test_unreadable_arch_list_is_an_error(tmp_path):
    code, message = resolve_archs(tmp_path, "sm_90")
    assert code != 0 and "cannot read 'sm_90'" in message


def test_forced_cuda_build_without_nvcc_fails_loudly(tmp_path):
    env = dict(os.environ, EASGD_EXT_CUDA="1", CUDACXX=str(tmp_path / "no-such-nvcc"))
    env.pop("CUDA_HOME", None)
    import pybind11

    proc = subprocess.run(
        [cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        env=env, capture_output=True, text=True)
    assert proc.returncode != 0, "EASGD_EXT_CUDA=1 must not fall back to a CPU-only build"
    assert "CUDA" in proc.stdout + proc.stderr


def test_readme_and_ci_run_both_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = re.findall(r"^(python3 -m pip install .*)$", readme, flags=re.M)
    main_job = [c for c in commands if c.endswith("python3 -m easgd_ext.train")]
    tests = [c for c in commands if "pytest" in c]
    assert main_job and tests, "README.md must show the main-job command and the test command"
    assert commands[:2] == [main_job[0], tests[0]], "README.md opens with the two commands"
    assert main_job[0] in ci, ".ci/run must run exactly the README's main-job command"
    assert tests[0] in ci, ".ci/run must run exactly the README's test command"


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_installed_package_imports_from_any_directory(where, tmp_path):
    """`python3 -m easgd_ext.train` from the repository root must find the installed package
    with its compiled easgd_ext._C, not a bare source folder shadowing it (``python -m`` puts the
    current directory first on sys.path): the first command of the README failed this way."""
    cwd = ROOT if where == "repository root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import easgd_ext, easgd_ext._C, easgd_ext.train, pathlib; "
             "print(pathlib.Path(easgd_ext.__file__).resolve().parent)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == Path(easgd_ext.__file__).resolve().parent
    # and the main job's entry point starts from there (its --help needs no workers)
    proc = subprocess.run([sys.executable, "-m", "easgd_ext.train", "--help"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_source_tree_cannot_shadow_the_installed_package():
    """The package lives in src/: no importable easgd_ext folder at the repository root."""
    assert not (ROOT / "easgd_ext").exists()
    assert (ROOT / "src" / "easgd_ext" / "__init__.py").is_file()
