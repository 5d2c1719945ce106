"""The static performance report's facts as gates (docs/DESIGN.md, "Performance model"):
for the benchmark shapes (ConvMixer-1536/20, 768/32, CIFAR-256/8; k = 3/7/9; fp32 and bf16;
NCHW and channels_last) every CUDA pass keeps its occupancy floor on sm_90, stages with
16-byte loads and stores its outputs with 16-byte stores, and moves at most 1.15x the
minimum bytes. The estimate is reported, never asserted."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "build", "static.json")

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    from convmixer_ext import _cmx_lib
    if not os.path.exists(_cmx_lib.library_path("cuda")):
        from setup import _find_cuda_home  # noqa: F401 - nvcc here means it must be built
        pytest.skip("the CUDA library is not built here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # the rows these tests read: the CUDA library's and the tensor-core kernels' (the Triton
    # CUDA-core rows, and compiling the whole benchmark set first, only cost CI time), the
    # latter for ConvMixer-1536 only: the benchmark set's tensor-core shape, in the Triton
    # cache after the real-target compiles (the other shapes' were ~70 s of compiles)
    r = subprocess.run([sys.executable, "-m", "benchmarks.static", "--backends", "cuda",
                        "triton_tc", "--tc-shapes", "cm1536", "--json", REPORT, "--md",
                        os.path.join(ROOT, "build", "static.md")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.load(open(REPORT))


def _cuda(report):
    for case in report["cases"]:
        for k in case["kernels"]:
            if k["backend"] == "cuda":
                yield case, k


def test_every_benchmark_case_is_reported(report):
    cases = {(c["shape_name"], c["dtype"], c["layout"], c["k"]) for c in report["cases"]}
    assert len(cases) == 3 * 2 * 2 * 3
    for c in report["cases"]:
        passes = sorted({k["pass_"] for k in c["kernels"] if k["backend"] == "cuda"})
        assert passes == ["B1", "B2", "F1", "F2"], c["shape_name"]
        assert c["modes"]["train_fwdbwd"]["cuda"]["predicted_ms"] > 0


def test_occupancy_floors_on_sm90(report):
    floor = report["occupancy_floor"]
    for case, k in _cuda(report):
        warps = k["occupancy"]["90"]["warps"]
        assert warps >= floor[k["pass_"]], (case["shape_name"], case["dtype"], case["layout"],
                                            case["k"], k["pass_"], k["occupancy"])


def test_16_byte_accesses_in_staging_and_epilogue(report):
    for case, k in _cuda(report):
        assert k["vec"], (case["shape_name"], case["layout"], "not on the 16-byte path")
        assert k["widths"]["LDG"].get("16", 0) > 0, (k["kernel"], k["widths"])
        if k["pass_"] in ("F2", "B2") or k["u"] == "save":  # they store out, dx, u
            assert k["widths"]["STG"].get("16", 0) > 0, (k["kernel"], k["widths"])


def test_every_cuda_row_is_a_compiled_instantiation(report):
    """The report's rows name the instantiation each pass launches (static.cuda_kt mirrors
    the library's dispatch): each has its compiled facts. With the saved convolution output
    (k = 7, 9 by default) F1 saves it, F2 appears twice (eval convolves, training reads)
    and B1, B2 read it."""
    for case in report["cases"]:
        rows = [k for k in case["kernels"] if k["backend"] == "cuda"]
        assert all(k["regs"] for k in rows), [(k["pass_"], k["u"]) for k in rows]
        saved = case["k"] >= 7
        assert [(k["pass_"], k["u"]) for k in rows] == (
            [("F1", "save"), ("F2", None), ("F2", "load"), ("B1", "load"), ("B2", "load")]
            if saved else [("F1", None), ("F2", None), ("B1", None), ("B2", None)]), case["k"]


def test_cuda_kernels_prefetch_what_they_stage(report):
    """The L2 prefetches survive to the sm_90 code of every CUDA pass (SASS CCTL.E.PF2), but
    F1 saving u (its register cap; docs/DESIGN.md, "L2 prefetch") and the kernels that stage
    nothing: F2 reading it (apply_u_kernel) and, in NCHW, B1 (bwd_reduce_u_kernel). The
    emulator's audit checks their addresses (tests/test_cuda_paths.py)."""
    for case, k in _cuda(report):
        if k["u"] == "save" or k["kernel"] in ("apply_u_kernel", "bwd_reduce_u_kernel"):
            assert k["prefetches"] == 0, (case["k"], k["kernel"])
        else:
            assert k["prefetches"] > 0, (case["shape_name"], case["k"], k["pass_"], k["u"])


def test_bytes_moved_within_115_percent_of_the_minimum(report):
    for case, k in _cuda(report):
        assert k["bytes_ratio"] <= 1.15, (case["shape_name"], case["dtype"], case["layout"],
                                          case["k"], k["pass_"], k["bytes_ratio"])
        assert k["local"] == 0 and k["stack"] == 0, (k["kernel"], case["dtype"], case["k"])
        # no spills, no stack frame (a register cap can make one without local spills)


def test_measured_times_are_set_against_the_prediction(tmp_path):
    """With a GPU benchmark's JSON, the report lists measured / predicted per case."""
    from benchmarks import static
    rows = [dict(shape_name="cm1536", dtype="float32", layout="nchw", k=9, kernels=[],
                 modes={"eval": {"eager_ms": 4.0, "roofline_ms": 0.27,
                                 "cuda": {"predicted_ms": 0.5, "vs_eager": 8.0,
                                          "pct_roofline": 54.0}}})]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"records": [
        {"kind": "block", "shape_name": "cm1536", "dtype": "float32", "layout": "nchw",
         "mode": "eval", "k": 9, "provider": p, "ms": ms}
        for p, ms in (("cuda", 1.0), ("eager", 3.0))]}))
    md = static.markdown(rows, static.compare(rows, static._measured([str(path)])))
    assert "| cm1536 | float32 | nchw | eval | 9 | cuda | 1.000 | 0.500 | 2.00 |" in md
    assert "| cm1536 | float32 | nchw | eval | 9 | eager | 3.000 | 4.000 | 0.75 |" in md
    # the calibration: per provider and mode, geometric mean and range of the ratios
    assert "| cuda | eval | 1 | 2.00 | 2.00 | 2.00 |" in md
    rows[0]["modes"]["train_fwdbwd"] = {"eager_ms": 10.0, "roofline_ms": 1.0,
                                        "cuda": {"predicted_ms": 2.0}}
    measured = {("cm1536", "float32", "nchw", "eval", 9, "cuda"): 1.0,
                ("cm1536", "float32", "nchw", "train_fwdbwd", 9, "cuda"): 8.0}
    cal = static.calibration(static.compare(rows, measured))
    assert [(c["mode"], round(c["geomean"], 6)) for c in cal] == [("eval", 2.0),
                                                                  ("train_fwdbwd", 4.0)]


def test_tensor_core_rows_issue_count_their_loops(report):
    """Every tensor-core kernel of the report carries the instructions a thread issues
    (its loops counted per iteration: more than the static count wherever a loop stayed
    rolled) and GEMMs without warp copies."""
    rows = [(c["k"], k) for c in report["cases"] for k in c["kernels"]
            if k["backend"] == "triton_tc"]
    assert rows
    rolled = 0
    for k, row in rows:
        if row["u"] == "load":  # reads the saved convolution output: no GEMM, no loop
            assert not row["gemms"] and not row["loops"], row
        else:
            assert row["gemms"] and all(g["copies"] == 1 for g in row["gemms"]), row
        assert row["instructions_per_thread"] > 0, row
        if row["loops"]:
            rolled += 1
            assert row["instructions_per_thread"] >= sum(row["loops"]) * (k - 1), row
    assert rolled  # B2b's loops stay rolled: the count above is exercised


_SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R1, 0x1, RZ ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LDG.E R3, desc[UR4][R6.64] ;
        /*0050*/                   FADD R3, R3, 1 ;
        /*0060*/              @!P1 BRA 0x40 ;
        /*0070*/              @!P2 BRA 0x90 ;
        /*0080*/                   STG.E desc[UR4][R6.64], R3 ;
        /*0090*/                   EXIT ;
"""


def test_loop_bodies_and_dynamic_instructions():
    """The issue count of a kernel with loops: each backward branch is a loop whose body
    (target .. branch) runs once per iteration; forward branches are not loops."""
    from benchmarks.static import dynamic_instructions, loop_bodies
    loops = loop_bodies(_SASS)
    assert loops == [3, 3]
    fact = dict(instructions=10, loops=loops)
    assert dynamic_instructions(fact, [9, 40]) == 10 + 3 * 8 + 3 * 39
    assert dynamic_instructions(dict(instructions=10, loops=[]), [9]) == 10  # unrolled
    assert dynamic_instructions(fact, [9]) is None  # more loops than the kernel has
    # one of two loops unrolled: the shorter one
    assert dynamic_instructions(dict(instructions=10, loops=[3]), [3, 18]) == 10 + 3 * 17
    assert dynamic_instructions(dict(instructions=10, loops=[3]), [20, 18]) == 10 + 3 * 19


def test_issue_rate_grows_with_resident_warps():
    """The estimate's issue rate: n / (n + stall) of one instruction per cycle with n warps
    per scheduler (fit to H100 kernel times); an issue-bound estimate shrinks as occupancy
    grows and never beats the full rate."""
    from benchmarks.static import H100, estimate, issue_rate
    n_half = 4 * H100["issue_stall"]  # warps per SM at which a scheduler issues half the time
    assert issue_rate(n_half) == pytest.approx(0.5)
    rates = [issue_rate(w) for w in (4, 8, 16, 32, 64)]
    assert rates == sorted(rates) and 0 < rates[0] and rates[-1] < 1
    t = [estimate(0, 0, 0, 1e12, 0, w, 16, 10**6)[0] for w in (8, 16, 32)]
    assert t[0] > t[1] > t[2]
    full = 1e12 / (H100["sms"] * H100["schedulers"] * 32 * H100["clock"])
    assert t[2] > full


def test_tc_shapes_outside_the_shapes_are_refused(capsys):
    """A --tc-shapes name that is not a reported shape (a typo) would drop the tensor-core
    rows without a word: it is refused before anything compiles."""
    from benchmarks.static import main
    with pytest.raises(SystemExit) as e:
        main(["--tc-shapes", "cm1563"])
    assert e.value.code == 2
    assert "--tc-shapes ['cm1563']: not among --shapes" in capsys.readouterr().err


def test_cuda_facts_are_kept_per_library_bytes(monkeypatch, tmp_path):
    """The CUDA library's facts (about 25 s of disassembly) are read once per library: kept
    under a hash of its bytes, read back for the same bytes at another path (the installed
    wheel's copy), read again for other bytes."""
    from benchmarks import static
    reads = []
    monkeypatch.setattr(static, "FACTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(static, "_read_cuda_kernel_facts",
                        lambda path: reads.append(path) or {(90, "k", "bfloat16", 9, False):
                                                            {"regs": len(reads)}})
    lib, copy = tmp_path / "a.so", tmp_path / "copy.so"
    lib.write_bytes(b"one")
    copy.write_bytes(b"one")
    try:
        static.cuda_kernel_facts.cache_clear()
        first = static.cuda_kernel_facts(str(lib))
        static.cuda_kernel_facts.cache_clear()
        assert static.cuda_kernel_facts(str(copy)) == first and len(reads) == 1
        lib.write_bytes(b"two")
        static.cuda_kernel_facts.cache_clear()
        assert static.cuda_kernel_facts(str(lib))[(90, "k", "bfloat16", 9, False)] == \
            {"regs": 2}
    finally:
        static.cuda_kernel_facts.cache_clear()
