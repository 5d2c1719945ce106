"""Build script: the pure-Python package plus, when the toolchain allows, two builds of one
C-ABI kernel library compiled from ``csrc/`` (no torch header, no torch at build time, so
``pip install .`` builds it in pip's isolated environment; docs/DESIGN.md, "Build and ABI"):

- ``convmixer_ext/_cmx_cuda.so``: the CUDA kernels (nvcc, ahead of time, CUDA runtime linked
  statically). Built whenever nvcc is found (``CUDA_HOME``, ``CUDA_PATH``, /usr/local/cuda,
  or nvcc on ``PATH``), GPU or not. Architectures: ``CONVMIXER_EXT_CUDA_ARCHS``, else
  ``TORCH_CUDA_ARCH_LIST``, else "8.0;9.0+PTX" ("+PTX" embeds PTX for newer GPUs).
  ``CONVMIXER_EXT_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal (otherwise a failed
  build installs the package without it, with a notice).
- ``convmixer_ext/_cmx_emu.so``: the same kernels for CPU tensors through the host emulator
  (tests). Built with ``CONVMIXER_EXT_BUILD_EMU=1`` (``make test`` sets it); needs a C++20
  compiler (``CXX``, default g++). ``CONVMIXER_EXT_EMU_SANITIZE=1``: with ASan/UBSan.

``CONVMIXER_EXT_BUILD_CACHE=<dir>`` keeps each library compiled there under a key of its
whole compile command (output path aside), the compiler's ``--version`` and every file in
``csrc/``, and copies it from there when the key recurs (the Makefile's builds share one, so
that ``make wheel`` after ``make build`` does not compile the same source twice).
``compile_libraries()`` fills that cache ahead of the install, needing neither torch nor
setuptools (the Makefile's ``libraries``, beside the venv's install).

The libraries are loaded with ctypes, so the wheel does not depend on the Python or torch
version: it is tagged ``py3-none-<platform>``.
"""
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

try:
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext
except ImportError:  # compile_libraries() alone needs the standard library only
    if __name__ == "__main__":
        raise
    Extension = build_ext = object

try:  # setuptools >= 70.1 ships bdist_wheel; older ones need the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel support here: pip's isolated build installs it
        bdist_wheel = None

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


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


def arch_flags(spec):
    """nvcc -gencode flags and the arch names for a list like "8.0;9.0+PTX" (also "8.0 9.0",
    "80,90", "9.0a"). Returns (flags, ["sm_80", "sm_90", "compute_90"])."""
    flags, names = [], []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        suffix = "a" if num.endswith("a") else ""
        num = num.rstrip("a").replace(".", "")
        if not num.isdigit():
            raise ValueError(f"cannot parse CUDA architecture {item!r} in {spec!r}")
        code = [f"sm_{num}{suffix}"] + ([f"compute_{num}{suffix}"] if ptx else [])
        flags += ["-gencode", f"arch=compute_{num}{suffix},code=[{','.join(code)}]"]
        names += code
    if not names:
        raise ValueError(f"no CUDA architecture in {spec!r}")
    return flags, names


def _notice(msg):
    print(f"convmixer-ext: {msg}", file=sys.stderr)


class CmxLibrary(Extension):
    """A ctypes-loaded shared library (not a Python extension module)."""

    def __init__(self, name, kind, source):
        super().__init__(name, sources=[source])
        self.kind = kind  # "cuda" or "emulation"


def _cuda_command(cuda_home, out):
    spec = os.environ.get("CONVMIXER_EXT_CUDA_ARCHS") or \
        os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    flags, names = arch_flags(spec)
    threads = str(min(os.cpu_count() or 1, 8))
    return [os.path.join(cuda_home, "bin", "nvcc"), "-O3", "-std=c++17", "-lineinfo",
            "--expt-relaxed-constexpr", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "-Xlinker", "--exclude-libs,ALL", "-cudart", "static", "--threads", threads,
            f"-DCMX_ARCH_LIST=\"{','.join(names)}\"", *flags,
            os.path.join(HERE, "csrc", "fused_dw.cu"), "-o", out]


def _emu_command(out):
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O2", "-std=c++20", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden"]
    if _env_flag("CONVMIXER_EXT_EMU_SANITIZE"):
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    return [cxx, *flags, os.path.join(HERE, "csrc", "fused_dw_emu.cpp"), "-o", out]


def _command(kind, out):
    """The compile command of a library of this kind ("cuda" or "emulation") to ``out``."""
    return _cuda_command(_find_cuda_home(), out) if kind == "cuda" else _emu_command(out)


def _cache_key(cmd, out):
    """What a library's bytes depend on: its compile command (output path aside, the source
    tree's location left out), the compiler's version and every file in csrc/."""
    h = hashlib.sha256()
    for arg in cmd:
        h.update(("<out>" if arg == out else arg.replace(HERE, "<src>")).encode() + b"\0")
    h.update(subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout.encode())
    csrc = os.path.join(HERE, "csrc")
    for name in sorted(os.listdir(csrc)):
        with open(os.path.join(csrc, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:24]


def _compile(cmd, out, name):
    """Runs cmd, or copies its earlier output from CONVMIXER_EXT_BUILD_CACHE; returns
    (returncode, message)."""
    cache = os.environ.get("CONVMIXER_EXT_BUILD_CACHE", "").strip()
    hit = os.path.join(cache, f"{name}-{_cache_key(cmd, out)}.so") if cache else None
    if hit and os.path.isfile(hit):
        print(f"convmixer-ext: {name} from the build cache ({hit})", file=sys.stderr)
        shutil.copyfile(hit, out)
        return 0, ""
    print("convmixer-ext: " + " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if r.returncode == 0 and hit:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{hit}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp)
        os.replace(tmp, hit)  # whole or absent, for a concurrent build
    return r.returncode, (r.stderr or r.stdout).strip()


class BuildLibraries(build_ext):
    """Compiles the CmxLibrary entries with nvcc / the host compiler; a CUDA build that
    fails is dropped with a notice unless CONVMIXER_EXT_BUILD_CUDA=1."""

    def get_ext_filename(self, fullname):
        # called with the dotted name and with its last component: plain "<name>.so", no
        # Python ABI suffix (ctypes loads it)
        ours = {e.name.rsplit(".", 1)[-1] for e in self.extensions if isinstance(e, CmxLibrary)}
        if fullname.rsplit(".", 1)[-1] in ours:
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extensions(self):
        for ext in list(self.extensions):
            if not isinstance(ext, CmxLibrary):
                self.build_extension(ext)
                continue
            out = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            cmd = _command(ext.kind, out)
            rc, msg = _compile(cmd, out, ext.name.rsplit(".", 1)[-1])
            if rc == 0:
                continue
            why = f"{cmd[0]} failed: {msg[-2000:]}"
            if ext.kind == "emulation" or _env_flag("CONVMIXER_EXT_BUILD_CUDA"):
                raise RuntimeError(f"building {ext.name} failed:\n{why}")
            _notice(f"the CUDA kernels did not build, installing without them: {why}")
            BUILD_INFO["SKIPPED"]["cuda"] = "the CUDA build failed at install time"
            if os.path.exists(out):  # (in place) an older source's library would load instead
                os.remove(out)
            self.extensions.remove(ext)
            for pkg_dir in {os.path.join(HERE, "convmixer_ext"),
                            os.path.dirname(self.get_ext_fullpath(ext.name))}:
                _write_build_info(pkg_dir)


if bdist_wheel is not None:
    class WheelAnyPython(bdist_wheel):
        """The libraries are loaded with ctypes: one wheel per platform, any Python."""

        def get_tag(self):
            python, abi, plat = super().get_tag()
            return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


def _source_commit():
    """The git commit the package is built from (None outside a git checkout); a dirty tree
    is marked, so that results name the code that produced them."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True,  # noqa: E731
                                        text=True, timeout=30)
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# SKIPPED: why a library is absent (read by convmixer_ext.backends); COMMIT: the source's
BUILD_INFO = {"SKIPPED": {}, "COMMIT": _source_commit()}


def _write_build_info(pkg_dir):
    with open(os.path.join(pkg_dir, "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for k, v in BUILD_INFO.items():
            f.write(f"{k} = {v!r}\n")


def _libraries():
    """The CmxLibrary entries to build, as the environment asks (module docstring)."""
    return [CmxLibrary(name, kind, source) for name, kind, source in _wanted()]


def _wanted():
    """[(module name, kind, source)] of the libraries to build; records why one is not."""
    libs = []
    want_cuda = _env_flag("CONVMIXER_EXT_BUILD_CUDA")
    cuda_home = _find_cuda_home()
    if want_cuda is False:
        BUILD_INFO["SKIPPED"]["cuda"] = "disabled by CONVMIXER_EXT_BUILD_CUDA=0"
    elif cuda_home is None:
        if want_cuda:
            raise RuntimeError("CONVMIXER_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be "
                               "built: nvcc / CUDA toolkit not found (set CUDA_HOME)")
        BUILD_INFO["SKIPPED"]["cuda"] = "nvcc was not found when the package was built"
        _notice("nvcc not found (set CUDA_HOME): installing without the CUDA kernels; "
                "CUDA tensors will run on Triton or PyTorch")
    else:
        libs.append(("convmixer_ext._cmx_cuda", "cuda", "csrc/fused_dw.cu"))
    if _env_flag("CONVMIXER_EXT_BUILD_EMU"):
        libs.append(("convmixer_ext._cmx_emu", "emulation", "csrc/fused_dw_emu.cpp"))
    else:
        BUILD_INFO["SKIPPED"]["emulation"] = \
            "the host emulation is built only with CONVMIXER_EXT_BUILD_EMU=1"
    return libs


def compile_libraries():
    """Compiles the libraries the environment asks for (as ``pip install`` would) into
    CONVMIXER_EXT_BUILD_CACHE, all at once, where the install then copies them from. Needs
    neither torch nor setuptools, so the Makefile runs it beside the venv's install (pip
    keeps one core busy, the compilers the other). Returns 1 if one fails (the install
    would fail the same way, or drop the CUDA library with a notice)."""
    if not os.environ.get("CONVMIXER_EXT_BUILD_CACHE", "").strip():
        _notice("CONVMIXER_EXT_BUILD_CACHE is not set: nothing to compile ahead of the install")
        return 0
    libs = _wanted()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, kind, _ in libs:
            short = name.rsplit(".", 1)[-1]
            out = os.path.join(tmp, short + ".so")
            jobs.append((_command(kind, out), out, short))
        with concurrent.futures.ThreadPoolExecutor(max(1, len(jobs))) as pool:
            results = list(pool.map(lambda job: _compile(*job), jobs))
    failed = [(name, msg) for (name, _, _), (rc, msg) in zip(libs, results) if rc]
    for name, msg in failed:
        _notice(f"building {name} failed: {msg[-2000:]}")
    return 1 if failed else 0


if __name__ == "__main__":  # (tests import the helpers above from here)
    ext_modules = _libraries()
    _write_build_info(os.path.join(HERE, "convmixer_ext"))  # updated by BuildLibraries
    cmdclass = {"build_ext": BuildLibraries}
    if bdist_wheel is not None:
        cmdclass["bdist_wheel"] = WheelAnyPython
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
