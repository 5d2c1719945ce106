"""Build checks: the CUDA kernels compile for sm_80 and sm_90 with no register spills, and
the host-emulation build is the same kernel source."""
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from setup import _find_cuda_home  # noqa: E402


def _ptxas_report(cuda_home, arch):
    from torch.utils.cpp_extension import include_paths
    cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3",
           "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas", "-v",
           os.path.join(ROOT, "csrc", "fused_dw.cu"), "-o", os.devnull,
           "-I" + sysconfig.get_paths()["include"]] + ["-I" + p for p in include_paths()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout + r.stderr


def test_no_register_spills_sm80_sm90():
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        from convmixer_ext import _extension
        assert "_C" not in getattr(_extension._info, "BUILT", []), \
            "the CUDA extension was built, so nvcc must be found for this check"
        pytest.skip("no CUDA toolkit on this machine")
    with ThreadPoolExecutor(2) as pool:
        reports = dict(zip(("80", "90"), pool.map(lambda a: _ptxas_report(cuda_home, a),
                                                  ("80", "90"))))
    for arch, rep in reports.items():
        entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", rep)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rep)
        assert len(entries) == 60 and len(spills) == len(entries), (arch, len(entries))
        bad = [(e, s) for e, s in zip(entries, spills) if s != ("0", "0")]
        assert not bad, f"register spills on sm_{arch}: {bad}"


def test_emulation_build_is_the_same_source():
    src = open(os.path.join(ROOT, "csrc", "fused_dw_emu.cpp")).read()
    assert '#include "fused_dw.cu"' in src and "#define CMX_HOST_EMULATION 1" in src
    # one launch helper for every kernel: no raw <<<...>>> outside cmx_device.h
    for name in ("fused_dw.cu", "fused_dw_kernels.cuh"):
        assert "<<<" not in open(os.path.join(ROOT, "csrc", name)).read(), name


# --------------------------------------------------------------------------- build decisions
import setup as _setup  # noqa: E402


def _ext_names(exts):
    return sorted(e.name for e in exts)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("CONVMIXER_EXT_BUILD_CUDA", "CONVMIXER_EXT_BUILD_EMU", "TORCH_CUDA_ARCH_LIST",
              "CONVMIXER_EXT_EMU_SANITIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # restored afterwards
    return monkeypatch


def test_build_without_nvcc_installs_pure_python(clean_env):
    clean_env.setattr(_setup, "_find_cuda_home", lambda: None)
    exts, cmdclass, info = _setup._extensions()
    assert exts == [] and "nvcc" in info["SKIPPED"]["_C"]
    clean_env.setenv("CONVMIXER_EXT_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="cannot be built"):
        _setup._extensions()


def test_build_without_torch_installs_pure_python(clean_env):
    clean_env.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    exts, cmdclass, info = _setup._extensions()
    assert exts == [] and cmdclass == {} and info["TORCH_VERSION"] is None


def test_build_switches_and_arch_list(clean_env):
    import torch
    clean_env.setattr(_setup, "_find_cuda_home", lambda: "/usr/local/cuda")
    clean_env.setenv("CONVMIXER_EXT_BUILD_CUDA", "0")
    clean_env.setenv("CONVMIXER_EXT_BUILD_EMU", "1")
    exts, _, info = _setup._extensions()
    assert _ext_names(exts) == ["convmixer_ext._C_emu"] and "disabled" in info["SKIPPED"]["_C"]
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: no CUDA extension to configure")
    clean_env.delenv("CONVMIXER_EXT_BUILD_CUDA")
    clean_env.delenv("CONVMIXER_EXT_BUILD_EMU")
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    exts, _, info = _setup._extensions()
    assert _ext_names(exts) == ["convmixer_ext._C"] and info["CUDA_ARCHS"] == "9.0"
    assert info["TORCH_VERSION"] == torch.__version__
    clean_env.delenv("TORCH_CUDA_ARCH_LIST")
    _, _, info = _setup._extensions()
    assert info["CUDA_ARCHS"] == "8.0;9.0"
