"""Build and ABI checks (docs/DESIGN.md, "Build and ABI"): the CUDA library holds sm_80 and
sm_90 code plus PTX, has no register spills, needs no torch and resolves every symbol;
the host-emulation build is the same source; the build decisions of setup.py."""
import ctypes
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import setup as _setup  # noqa: E402
from convmixer_ext import _cmx_lib, backends  # noqa: E402


def _lib_path(kind):
    path = _cmx_lib.library_path(kind)
    if not os.path.exists(path):
        if kind == "cuda" and _setup._find_cuda_home() is not None:
            pytest.fail("nvcc is here, so the CUDA library must have been built")
        pytest.skip(f"the {kind} library is not built here")
    return path


@pytest.mark.parametrize("kind", ["cuda", "emulation"])
def test_library_resolves_without_torch(kind):
    """Loaded with every symbol bound at once (RTLD_NOW), no undefined symbol, no link to
    any torch library, and only the C ABI exported: it works with any torch version."""
    path = _lib_path(kind)
    ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    r = subprocess.run(["ldd", "-r", path], capture_output=True, text=True)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "undefined symbol" not in r.stdout + r.stderr, r.stdout + r.stderr
    # the libraries ldd names and the paths it resolves, without their load addresses
    # (a random address can read "...c10...": 0x00007f4fc101e000)
    linked = re.sub(r"\(0x[0-9a-f]+\)", "", r.stdout)
    assert "torch" not in linked and "c10" not in linked, r.stdout
    nm = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True)
    exported = {ln.split()[-1] for ln in nm.stdout.splitlines() if " T " in ln}
    assert exported and all(s.startswith("cmx_") for s in exported), sorted(exported)[:20]
    lib = _cmx_lib.Library(path, {"gelu": 0, "gelu_tanh": 1, "relu": 2})
    assert lib.kind == ("cuda" if kind == "cuda" else "emulation")


def test_cuda_library_holds_sm80_sm90_and_ptx():
    from benchmarks.targets import tool
    path = _lib_path("cuda")
    r = subprocess.run([tool("cuobjdump"), "--list-elf", "--list-ptx", path],
                       capture_output=True, text=True, check=True)
    assert "sm_80" in r.stdout and "sm_90" in r.stdout and ".sm_90.ptx" in r.stdout, r.stdout
    lib = backends.library("cuda")[0]
    assert lib.archs == ["sm_80", "sm_90", "compute_90"]


def test_cuda_library_has_no_spills():
    """Every kernel instantiation for each architecture: no local memory (spills) and no
    stack frame. 3 dtypes x (4 kernels x k in {3, 5, 7, 9, generic}; with the saved
    convolution output, F1 and B2 x k in {7, 9, generic}, F2 (tiled, for other strides) and
    B1 (channels_last, ...) x 1, F2 element by element and B1's direct loads in NCHW), and
    F2 on tensor cores for the 2 16-bit dtypes x k in {3, 5, 7, 9, generic} x with the
    input affine, without it, and without it taking several images a block, F1 on tensor cores (saving u) for the 2 16-bit dtypes x k in
    {7, 9, generic} x with and without it, and B2 on tensor cores (reading the saved u) for
    the 2 16-bit dtypes x k in {7, 9, generic} x du recomputed or read (its du pass,
    du_kernel, for the 2 16-bit dtypes) x with and without the input affine."""
    from benchmarks.targets import resource_usage
    rows = resource_usage(_lib_path("cuda"))
    for arch in (80, 90):
        mine = [r for r in rows if r["arch"] == arch]
        assert len(mine) == 3 * (4 * 5 + 2 * 3 + 2 + 2) + 2 * 5 * 3 + 2 * 3 * 2 \
            + 2 * 3 * 2 * 2 + 2, (arch, len(mine))
        bad = [r for r in mine if r["local"] or r["stack"]]
        assert not bad, f"spills / stack frames on sm_{arch}: {bad}"


def test_tensor_core_kernel_is_on_tensor_cores():
    """F2's, F1's and B2's tensor-core kernels run their convolutions as HMMA instructions in
    the sm_80 and the sm_90 code of every instantiation (the emulator runs its arithmetic,
    not this instruction): for the unrolled k (one MMA k-step up to k = 9) K * 4 of them,
    twice that with the input affine's mask MMAs; the CUDA-core kernels have none."""
    from benchmarks.static import cuda_kernel_facts
    facts = cuda_kernel_facts(_lib_path("cuda"))
    for arch in (80, 90):
        # F2's: its AFF and PIPE (several images a block: the plain input only, its loop's
        # body the one-image kernel's MMAs)
        mma = {key: f for key, f in facts.items() if key[0] == arch and
               key[1] == "apply_mma_kernel"}
        assert sorted(k[2:] for k in mma) == [
            (dt, kt, aff, pipe) for dt in ("bfloat16", "float16") for kt in (0, 3, 5, 7, 9)
            for aff, pipe in ((False, False), (False, True), (True, False))]
        for (_, _, _, kt, aff, pipe), f in mma.items():
            assert f["hmma"] > 0, (arch, kt, aff)
            if kt:
                assert f["hmma"] == (2 if aff else 1) * kt * 4, (arch, kt, aff, f["hmma"])
            # the pipelined kernel's halo copies are cp.async (LDGSTS), the others' not
            assert bool(f["widths"].get("LDGSTS")) == pipe, (arch, kt, aff, f["widths"])
        # B2's: dx as F2's over du's two terms (K * ks * 4 * 2, ks = 1 up to k = 9) and dW's
        # loop body (2 k-steps x ceil(k / 8) tiles x 2 terms), as many times as the compiler
        # unrolled it; with du recomputed on the halo or read (du_kernel's), the same; with
        # the input affine, dW's twice (the mask's MMAs beside x's)
        b2 = {key: f for key, f in facts.items() if key[0] == arch and
              key[1] == "bwd_mma_kernel"}
        assert sorted(k[2:] for k in b2) == [
            (dt, kt, du, aff) for dt in ("bfloat16", "float16") for kt in (0, 7, 9)
            for du in (False, True) for aff in (False, True)]
        for (_, _, dt, kt, du, aff), f in b2.items():
            assert f["hmma"] == b2[(arch, "bwd_mma_kernel", dt, kt, not du, aff)]["hmma"]
            if kt and aff:
                plain = b2[(arch, "bwd_mma_kernel", dt, kt, du, False)]["hmma"]
                assert f["hmma"] - plain == plain - kt * 4 * 2, (arch, kt, f["hmma"], plain)
        for (_, _, _, kt, _, _), f in b2.items():
            assert f["hmma"] > 0, (arch, kt)
            if kt:
                dw = f["hmma"] - kt * 4 * 2
                assert dw > 0 and dw % (2 * -(-kt // 8) * 2) == 0, (arch, kt, f["hmma"])
        # F1's: F2's MMAs (its epilogue saves u and sums g instead)
        f1 = {key: f for key, f in facts.items() if key[0] == arch and
              key[1] == "stats_mma_kernel"}
        assert sorted(k[2:] for k in f1) == [
            (dt, kt, aff) for dt in ("bfloat16", "float16") for kt in (0, 7, 9)
            for aff in (False, True)]
        for (_, _, _, kt, aff), f in f1.items():
            assert f["hmma"] > 0 and (not kt or f["hmma"] == (2 if aff else 1) * kt * 4)
        others = [key for key, f in facts.items() if key[0] == arch and key[1] not in
                  ("apply_mma_kernel", "stats_mma_kernel", "bwd_mma_kernel") and f["hmma"]]
        assert not others, others


def test_no_cuda_device_is_the_reason_here():
    """Built but run where there is no GPU: the reason says so, not "not built"."""
    import torch
    _lib_path("cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    why = backends.backend_reason("cuda")
    assert why and "no CUDA device" in why and "not built" not in why


def test_emulation_build_is_the_same_source():
    src = open(os.path.join(ROOT, "csrc", "fused_dw_emu.cpp")).read()
    assert '#include "fused_dw.cu"' in src and "#define CMX_HOST_EMULATION 1" in src
    # one launch helper for every kernel: no raw <<<...>>> outside cmx_device.h
    for name in ("fused_dw.cu", "fused_dw_kernels.cuh"):
        text = open(os.path.join(ROOT, "csrc", name)).read()
        assert "<<<" not in text, name
        assert not re.search(r'#include\s*[<"](torch|ATen|c10)/', text), name


# --------------------------------------------------------------------------- build decisions
@pytest.fixture
def clean_env(monkeypatch):
    for k in ("CONVMIXER_EXT_BUILD_CUDA", "CONVMIXER_EXT_BUILD_EMU", "TORCH_CUDA_ARCH_LIST",
              "CONVMIXER_EXT_CUDA_ARCHS", "CONVMIXER_EXT_EMU_SANITIZE",
              "CONVMIXER_EXT_BUILD_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(_setup, "BUILD_INFO", {"SKIPPED": {}})
    return monkeypatch


def _names(libs):
    return sorted(e.name for e in libs)


def test_build_without_nvcc_installs_pure_python(clean_env):
    clean_env.setattr(_setup, "_find_cuda_home", lambda: None)
    assert _setup._libraries() == []
    assert "nvcc" in _setup.BUILD_INFO["SKIPPED"]["cuda"]
    clean_env.setenv("CONVMIXER_EXT_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="cannot be built"):
        _setup._libraries()


def test_build_switches(clean_env):
    clean_env.setattr(_setup, "_find_cuda_home", lambda: "/usr/local/cuda")
    assert _names(_setup._libraries()) == ["convmixer_ext._cmx_cuda"]
    clean_env.setenv("CONVMIXER_EXT_BUILD_CUDA", "0")
    clean_env.setenv("CONVMIXER_EXT_BUILD_EMU", "1")
    assert _names(_setup._libraries()) == ["convmixer_ext._cmx_emu"]
    assert "disabled" in _setup.BUILD_INFO["SKIPPED"]["cuda"]


def test_failed_cuda_build_leaves_no_stale_library(clean_env, tmp_path):
    """A CUDA build that fails (and is dropped: CONVMIXER_EXT_BUILD_CUDA unset) removes the
    library an earlier build left at its output path (an in-place build's), so that the old
    kernels are not loaded as if they were the source's; with CONVMIXER_EXT_BUILD_CUDA=1 the
    failure is fatal."""
    from setuptools import Distribution
    out = tmp_path / "_cmx_cuda.so"
    written = []
    clean_env.setattr(_setup, "_find_cuda_home", lambda: "/usr/local/cuda")
    clean_env.setattr(_setup, "_cuda_command",
                      lambda home, o: [sys.executable, "-c", "import sys; sys.exit(3)"])
    clean_env.setattr(_setup, "_write_build_info", lambda d: written.append(d))

    def build():
        out.write_bytes(b"an older build")
        cmd = _setup.BuildLibraries(Distribution())
        cmd.extensions = [_setup.CmxLibrary("convmixer_ext._cmx_cuda", "cuda", "csrc/fused_dw.cu")]
        cmd.get_ext_fullpath = lambda name: str(out)
        cmd.build_extensions()
        return cmd
    cmd = build()
    assert not out.exists() and cmd.extensions == [] and written
    assert "failed" in _setup.BUILD_INFO["SKIPPED"]["cuda"]
    clean_env.setenv("CONVMIXER_EXT_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="failed"):
        build()


def test_build_cache_reuses_only_the_same_compile(clean_env, tmp_path):
    """CONVMIXER_EXT_BUILD_CACHE: a library compiled once is copied when the same command
    recurs (another output path, as the wheel's build after the in-place one); a changed
    command or a changed file in csrc/ compiles again; a failed compile is not kept."""
    runs = tmp_path / "runs"
    src = tmp_path / "src"
    (src / "csrc").mkdir(parents=True)
    (src / "csrc" / "k.cu").write_text("one")
    clean_env.setattr(_setup, "HERE", str(src))
    clean_env.setenv("CONVMIXER_EXT_BUILD_CACHE", str(tmp_path / "cache"))

    def compile_(out, flag="-O3", rc=0):
        prog = (f"import sys; open({str(runs)!r}, 'a').write('x'); "
                f"open(sys.argv[-1], 'w').write({flag!r}); sys.exit({rc})")
        return _setup._compile([sys.executable, "-c", prog, flag, str(out)], str(out), "lib")
    assert compile_(tmp_path / "a.so") == (0, "")
    assert compile_(tmp_path / "b.so") == (0, "")             # a hit: copied, not run
    assert runs.read_text() == "x" and (tmp_path / "b.so").read_text() == "-O3"
    assert compile_(tmp_path / "c.so", flag="-O2")[0] == 0    # another command
    assert runs.read_text() == "xx" and (tmp_path / "c.so").read_text() == "-O2"
    (src / "csrc" / "k.cu").write_text("two")
    compile_(tmp_path / "d.so")                               # another source
    assert runs.read_text() == "xxx"
    assert compile_(tmp_path / "e.so", flag="-bad", rc=1)[0] == 1
    assert compile_(tmp_path / "e.so", flag="-bad", rc=1)[0] == 1  # not kept: run again
    assert runs.read_text() == "xxxxx"
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_libraries_compiled_ahead_are_the_installs(clean_env, tmp_path):
    """compile_libraries() (the Makefile's ``libraries``, beside the venv's install) fills the
    build cache with exactly what the install then looks up: the install's compile of the
    same library, to its own output path, is copied, not run. A failed compile returns 1;
    without a cache it compiles nothing. setup.py imports without setuptools for it."""
    runs = tmp_path / "runs"

    def emu_command(out, rc=0):
        prog = (f"import sys; open({str(runs)!r}, 'a').write('x'); "
                f"open(sys.argv[-1], 'w').write('emu'); sys.exit({rc})")
        return [sys.executable, "-c", prog, str(out)]
    clean_env.setattr(_setup, "_emu_command", emu_command)
    clean_env.setattr(_setup, "_find_cuda_home", lambda: None)
    clean_env.setenv("CONVMIXER_EXT_BUILD_EMU", "1")
    assert _setup.compile_libraries() == 0 and not runs.exists()   # no cache: nothing
    clean_env.setenv("CONVMIXER_EXT_BUILD_CACHE", str(tmp_path / "cache"))
    assert _setup.compile_libraries() == 0 and runs.read_text() == "x"
    out = tmp_path / "installed.so"
    assert _setup._compile(emu_command(str(out)), str(out), "_cmx_emu") == (0, "")
    assert runs.read_text() == "x" and out.read_text() == "emu"       # copied
    clean_env.setattr(_setup, "_emu_command", lambda out: emu_command(out, rc=1))
    assert _setup.compile_libraries() == 1
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['setuptools'] = None; "
                        "import setup; print(setup._wanted())"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ,
                                                            "CONVMIXER_EXT_BUILD_CUDA": "0",
                                                            "CONVMIXER_EXT_BUILD_EMU": "0"})
    assert r.returncode == 0 and "[]" in r.stdout, r.stderr


@pytest.mark.parametrize("spec, names", [
    ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
    ("8.0 8.6", ["sm_80", "sm_86"]),
    ("80,90a", ["sm_80", "sm_90a"]),
    ("9.0a+PTX", ["sm_90a", "compute_90a"]),
])
def test_arch_list_parsing(spec, names):
    flags, got = _setup.arch_flags(spec)
    assert got == names and flags.count("-gencode") == len(spec.replace(",", ";").replace(
        " ", ";").split(";"))


def test_arch_list_errors():
    with pytest.raises(ValueError, match="cannot parse"):
        _setup.arch_flags("sm80")
    with pytest.raises(ValueError, match="no CUDA architecture"):
        _setup.arch_flags(" ; ")


def test_default_arch_list_embeds_ptx(clean_env):
    cmd = _setup._cuda_command("/usr/local/cuda", "/tmp/x.so")
    assert "arch=compute_90,code=[sm_90,compute_90]" in cmd
    assert "arch=compute_80,code=[sm_80]" in cmd
    assert "torch" not in " ".join(cmd)
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert "arch=compute_86,code=[sm_86]" in _setup._cuda_command("/usr/local/cuda", "x")
    clean_env.setenv("CONVMIXER_EXT_CUDA_ARCHS", "9.0")
    assert "arch=compute_90,code=[sm_90]" in _setup._cuda_command("/usr/local/cuda", "x")
