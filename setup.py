"""Build script: the pure-Python package plus, when the toolchain allows, two extensions
compiled from the same kernel source in csrc/:

- ``convmixer_ext._C``: the CUDA kernels (nvcc, ahead of time, for TORCH_CUDA_ARCH_LIST,
  default "8.0;9.0"). Built when torch is a CUDA build and nvcc is found, whether or not a
  GPU is present. ``CONVMIXER_EXT_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal.
- ``convmixer_ext._C_emu``: the same kernels for CPU tensors through the host emulator
  (tests). Built when ``CONVMIXER_EXT_BUILD_EMU=1`` (``make test`` sets it).

Without torch in the build environment (an isolated ``pip install .``) or without nvcc,
the pure-Python package is installed with a one-line notice.
"""
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _env_flag(name):
    v = os.environ.get(name, "").strip().lower()
    return None if v == "" else v in ("1", "true", "yes", "on")


def _find_cuda_home():
    """A toolkit root with bin/nvcc and include/cuda_runtime.h (the nvcc on PATH may be a
    wrapper script, so its parent is not trusted blindly)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _notice(msg):
    print(f"convmixer-ext: {msg}", file=sys.stderr)


def _extensions():
    info = {"TORCH_VERSION": None, "BUILT": [], "SKIPPED": {}}
    try:
        import torch
    except ImportError:
        _notice("torch is not importable in the build environment; installing without "
                "compiled kernels (use `pip install --no-build-isolation .` to build them)")
        info["SKIPPED"] = {"_C": "torch missing at build time", "_C_emu": "torch missing at build time"}
        return [], {}, info
    info["TORCH_VERSION"] = torch.__version__
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    exts = []
    want_cuda = _env_flag("CONVMIXER_EXT_BUILD_CUDA")
    why_not = None
    if want_cuda is False:
        why_not = "disabled by CONVMIXER_EXT_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why_not = "torch is not a CUDA build"
    elif cuda_home is None:
        why_not = "nvcc / CUDA toolkit not found (set CUDA_HOME)"
    if why_not is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        exts.append(CUDAExtension(
            "convmixer_ext._C", ["csrc/fused_dw.cu"],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr",
                         "-Xptxas", "-v", "--threads", "2"],
            }))
        info["BUILT"].append("_C")
        info["CUDA_ARCHS"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    else:
        if want_cuda:
            raise RuntimeError(f"CONVMIXER_EXT_BUILD_CUDA=1 but the CUDA extension cannot be "
                               f"built: {why_not}")
        info["SKIPPED"]["_C"] = why_not
        _notice(f"not building the CUDA kernels: {why_not}; installing the Python/Triton package")
    if _env_flag("CONVMIXER_EXT_BUILD_EMU"):
        cflags = ["-O2", "-std=c++20", "-pthread"]
        ldflags = ["-pthread"]
        if _env_flag("CONVMIXER_EXT_EMU_SANITIZE"):
            cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
            ldflags += ["-fsanitize=address,undefined"]
        exts.append(CppExtension("convmixer_ext._C_emu", ["csrc/fused_dw_emu.cpp"],
                                 extra_compile_args=cflags, extra_link_args=ldflags))
        info["BUILT"].append("_C_emu")
    else:
        info["SKIPPED"]["_C_emu"] = "host emulation is built only with CONVMIXER_EXT_BUILD_EMU=1"
    return exts, ({"build_ext": BuildExtension} if exts else {}), info


if __name__ == "__main__":  # (tests import _find_cuda_home from here)
    ext_modules, cmdclass, build_info = _extensions()
    with open(os.path.join(HERE, "convmixer_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for k, v in build_info.items():
            f.write(f"{k} = {v!r}\n")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
