"""Real-target compiles (docs/DESIGN.md, "Verification", tier 2): every Triton
specialization the launchers pick on a GPU compiles for sm_90 (and sm_80 where its code
differs by target), with no register spills and within the shared-memory limit, and the
facts are recorded for the static report. The interpreter forgives what these catch (a Python-number global in a @jit
function, 16-bit dot operands, resource limits)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = os.path.join(ROOT, "build", "targets.json")

pytest.importorskip("triton")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def facts():
    r = _run(["-m", "benchmarks.targets", "--json", FACTS])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return json.load(open(FACTS))


def _values(facts, kernel, name):
    return {f["constexprs"].get(name) for f in facts["triton_kernels"] if f["kernel"] == kernel}


def test_every_kernel_compiles_for_sm80_and_sm90(facts):
    """Every specialization on sm_90; on sm_80 too those whose code differs by target
    (targets.every_target: the GEMMs and the tensor-core kernels, tl.dot), each of them."""
    from benchmarks.targets import every_target
    tk = facts["triton_kernels"]
    assert not [f for f in tk if "error" in f]
    per_arch = {a: {f["kernel"] for f in tk if f["arch"] == a} for a in (80, 90)}
    assert len(per_arch[90]) == 8
    assert per_arch[80] == per_arch[90] - {"_bwd_dw_kernel"}  # (CUDA cores only)

    def specs(arch, pick):
        return sorted(f["kernel"] + json.dumps(f["constexprs"], sort_keys=True)
                      + str(f["dtypes"]) + str(f["num_warps"])
                      for f in tk if f["arch"] == arch and pick(f))
    differs = lambda f: every_target((f["kernel"], (), f["constexprs"]))  # noqa: E731
    assert specs(80, differs) == specs(90, differs)
    assert not specs(80, lambda f: not differs(f))
    assert any(f["kernel"].startswith("_pw") for f in tk if f["arch"] == 80)
    assert sum(f["arch"] == 90 for f in tk) > 300


def test_covering_set_meets_every_constexpr_value(facts):
    from benchmarks.targets import COVER_KS
    dw = ("_stats_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_du_kernel",
          "_bwd_dx_kernel")
    for kern in dw:
        assert set(COVER_KS) <= _values(facts, kern, "K"), kern
        assert {True, False} <= _values(facts, kern, "IN_AFFINE"), kern
        assert {1, 2, 4, 8, 16, 32} <= _values(facts, kern, "BLOCK_C"), kern
    # channels_last's CUDA-core dW kernel: every k (1 to 2 tap blocks), partial channel blocks
    assert set(COVER_KS) <= _values(facts, "_bwd_dw_kernel", "K")
    assert {True, False} <= _values(facts, "_bwd_dw_kernel", "IN_AFFINE")
    assert {1, 4, 16, 128} <= _values(facts, "_bwd_dw_kernel", "TAPS")
    assert {2, 4, 8, 16, 32} <= _values(facts, "_bwd_dw_kernel", "LANES")
    # B2b on CUDA cores both with its tile's dW (one channel) and without (several)
    dx_fma = {f["constexprs"]["BLOCK_C"] > 1 for f in facts["triton_kernels"]
              if f["kernel"] == "_bwd_dx_kernel" and f["constexprs"]["TC"] == 0}
    assert {True, False} <= dx_fma
    for kern in dw[:4] + ("_pw_gemm_kernel", "_pw_bwd_du_kernel"):
        if kern != "_bwd_dx_kernel":
            assert {0, 1, 2} <= _values(facts, kern, "ACT"), kern
    assert {True, False} <= _values(facts, "_bwd_du_kernel", "BATCH_STATS")
    # tensor-core B2 with du stored as 16-bit terms and as the fp32 scratch, in float16 too
    for kern in ("_bwd_du_kernel", "_bwd_dx_kernel"):
        split = {(f["constexprs"]["SPLIT"], d) for f in facts["triton_kernels"]
                 if f["kernel"] == kern and f["constexprs"]["TC"] == 1
                 for d in f["dtypes"] if d in ("bfloat16", "float16")}
        assert {(True, "bfloat16"), (True, "float16"), (False, "float16")} <= split, kern
    dtypes = {d for f in facts["triton_kernels"] for d in f["dtypes"]}
    assert {"float32", "bfloat16", "float16"} <= dtypes
    # the GPU tile of the pointwise GEMM, 16-bit operands on tensor cores (the interpreter
    # upcasts them; this is the code that never runs there)
    pw16 = [f for f in facts["triton_kernels"] if f["kernel"].startswith("_pw")
            and ("bfloat16" in f["dtypes"] or "float16" in f["dtypes"])]
    assert pw16 and all(not f["constexprs"]["UPCAST"] and f["tensor_cores"] for f in pw16)
    assert all(f["constexprs"]["BLOCK_P"] == 128 and f["num_stages"] == 3 for f in pw16)


def test_tensor_core_convolution_is_on_tensor_cores(facts):
    """The "triton_tc" convolution (TC=1: 16-bit operands, never run by the interpreter,
    which takes TC=2) compiles to mma/wgmma on both targets, for both dtypes and every k of
    the covering set; the CUDA-core kernels (TC=0) have none."""
    tk = facts["triton_kernels"]
    tc = [f for f in tk if f["constexprs"].get("TC") == 1 and not _reads_u(f)]
    assert {f["arch"] for f in tc} == {80, 90}
    assert {"bfloat16", "float16"} <= {d for f in tc for d in f["dtypes"]}
    assert {1, 2, 3, 9, 16, 31} <= {f["constexprs"]["K"] for f in tc}  # (3: benchmark set)
    assert {"_stats_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_du_kernel",
            "_bwd_dx_kernel"} == {f["kernel"] for f in tc}
    assert all(f["tensor_cores"] for f in tc), [f["kernel"] for f in tc if not f["tensor_cores"]]
    assert not any(f["tensor_cores"] for f in tk if f["constexprs"].get("TC") == 0)
    # the tilings of 1, 2 and 4 images per program; on sm_90 the forward GEMMs of 64 rows
    # under 4 warps are warpgroup MMAs, under fewer warps mma.sync
    assert {1, 2, 4} <= {f["constexprs"]["IMG"] for f in tc}
    fwd90 = [f for f in tc if f["arch"] == 90 and f["kernel"] == "_apply_kernel"]
    for f in fwd90:
        rows = f["constexprs"]["TH"] * f["constexprs"]["IMG"]
        assert f["wgmma"] == (rows == 64 and f["num_warps"] == 4), f
    assert any(f["wgmma"] for f in fwd90) and not all(f["wgmma"] for f in fwd90)


def _reads_u(f):
    """Whether a kernel reads the saved convolution output instead of convolving (U_LOAD)."""
    return f["constexprs"].get("U") == 2


def test_saved_convolution_output_replaces_the_convolution(facts):
    """Every convolution kernel compiles computing u, computing and saving it (F1) and
    reading it (F2, B1, B2a), on CUDA cores and on tensor cores; a pass reading it has no
    GEMM and no loop left: the convolution is gone, not just unused."""
    tk = [f for f in facts["triton_kernels"] if "U" in f["constexprs"]]
    for tc in (0, 1):
        got = {(f["kernel"], f["constexprs"]["U"]) for f in tk if f["constexprs"]["TC"] == tc}
        assert {("_stats_kernel", 0), ("_stats_kernel", 1)} <= got, tc
        for kern in ("_apply_kernel", "_bwd_reduce_kernel", "_bwd_du_kernel"):
            assert {(kern, 0), (kern, 2)} <= got, (tc, kern)
    assert {f["kernel"] for f in tk if f["constexprs"]["U"] == 1} == {"_stats_kernel"}
    for f in tk:
        if _reads_u(f):
            assert not f["tensor_cores"] and not f.get("gemms") and not f.get("loops"), f


def test_tensor_core_gemms_compute_no_row_twice(facts):
    """Every tensor-core GEMM of the convolution lays its warps over distinct accumulator
    rows and columns: a TH-row GEMM under more than TH / 16 warps would have warps repeat
    the same rows, and the activation, statistics and stores after them, for nothing."""
    tc = [f for f in facts["triton_kernels"] if f["constexprs"].get("TC") == 1
          and not _reads_u(f)]
    assert tc and all(f["gemms"] for f in tc)
    for f in tc:
        for g in f["gemms"]:
            assert g["copies"] == 1, (f["kernel"], f["constexprs"], f["num_warps"], g)
        if f["kernel"] != "_bwd_dx_kernel":  # M: the program's images' tiles stacked
            assert {g["M"] for g in f["gemms"]} == \
                {f["constexprs"]["TH"] * f["constexprs"]["IMG"]}, f


def test_no_spills_and_shared_memory_within_limits(facts):
    from benchmarks.targets import SMEM_LIMIT
    for f in facts["triton_kernels"]:
        assert f["local"] == 0, f"spills: {f}"
        assert f["shared"] <= SMEM_LIMIT[f["arch"]], f
    for f in facts["cuda_kernels"]:  # the built CUDA library (empty without nvcc)
        assert f["local"] == 0 and f["stack"] == 0, f"spills / stack frame: {f}"


def test_python_number_global_fails_the_real_target_compile(tmp_path):
    """The mutant of the bug the interpreter hid: a GELU helper reading a Python float
    global (the density constant of GELU's derivative). The interpreter runs it; the
    real-target compile must refuse it."""
    code = ("import sys, convmixer_ext.triton_kernels as tk\n"
            "tk._PDF_A = -0.7213475204444817  # a plain float, not tl.constexpr\n"
            "from benchmarks import targets\n"
            "specs = [s for s in targets.specializations(('cover',))\n"
            "         if s[0] == '_bwd_du_kernel' and s[2]['ACT'] == 0][:1]\n"
            "fact = targets._compile_one((*specs[0], 90))\n"
            "print('ERROR' if 'error' in fact else 'COMPILED', fact.get('error', ''))\n")
    r = _run(["-c", code], TRITON_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR" in r.stdout and "_PDF_A" in r.stdout, r.stdout[-3000:]


def test_paths_set_meets_every_constexpr_value_but_the_kernel_sizes():
    """``--set paths`` (what ``make test-compat`` compiles with the oldest supported triton)
    gives every kernel every value of every constexpr the covering set gives it, except the
    kernel size and its padding (K, PB: unrolling and the halo, not which code runs)."""
    from benchmarks.targets import specializations

    def values(s):
        return {(name, key, v) for name, _, kw in specializations((s,)) for key, v in kw.items()
                if key not in ("K", "PB")}
    assert values("paths") == values("cover")
