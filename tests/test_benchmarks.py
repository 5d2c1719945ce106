"""Smoke run of the benchmark harness on the CPU providers: the code path the GPU run
takes (cases, correctness gate, JSON / Markdown / PNG output), at a tiny shape."""
import json
import os

import pytest

from benchmarks.run import main


def test_harness_smoke(tmp_path):
    rc = main(["--quick", "--device", "cpu", "--ks", "3", "5", "--modes", "eval",
               "train_fwdbwd", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and {os.path.splitext(f)[1] for f in files} == {".json", ".md", ".png"}
    data = json.load(open(tmp_path / (stems.pop() + ".json")))
    env, recs = data["environment"], data["records"]
    assert env["device"] == "cpu" and env["torch"] and "git_commit" in env
    assert len(recs) == 2 * 2 * 3  # k x mode x provider (eager, auto, torch)
    for r in recs:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["bytes_min"] > 0 and r["ms_p20"] <= r["ms_p80"]
    saved = {r["provider"]: r["saved_bytes"] for r in recs if r["mode"] == "train_fwdbwd"}
    # the fused block saves only x; the eager block keeps three activations
    assert saved["torch"] < saved["eager"]


def test_harness_reports_wrong_results_as_errors(tmp_path, monkeypatch):
    import benchmarks.run as run
    real = run.FusedBlock.forward
    monkeypatch.setattr(run.FusedBlock, "forward", lambda self, x: real(self, x) + 1.0)
    rc = main(["--quick", "--device", "cpu", "--ks", "3", "--modes", "eval",
               "--providers", "torch", "--out", str(tmp_path)])
    data = json.load(open(next(tmp_path.glob("*.json"))))
    assert rc == 1 and "mismatch" in data["records"][0]["error"]
    assert "ms" not in data["records"][0]


def test_harness_model_section(tmp_path):
    """The whole-model section: eager, what convert() gives by default ("auto"), fused
    (pointwise unfused) and fused with the pointwise block and BN2 folded (+pw), each with
    training and inference images/s."""
    rc = main(["--quick", "--device", "cpu", "--ks", "3", "--no-blocks", "--model",
               "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.load(open(next(tmp_path.glob("*.json"))))
    models = [r for r in data["records"] if r.get("kind") == "model"]
    assert {r["provider"] for r in models} == {"eager", "auto", "fused-torch", "fused-torch+pw"}
    for r in models:
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
    saved = {r["provider"]: r["train_saved_bytes"] for r in models}
    # eager keeps ~6 activations per layer, the fused depthwise block 1 (x) plus the
    # unfused pointwise half's 3, the folded chain 2 (g and y)
    assert saved["fused-torch+pw"] < saved["fused-torch"] < saved["eager"]
    assert saved["auto"] == saved["eager"]  # on the CPU "auto" runs the reference's own ops
    md = next(tmp_path.glob("*.md")).read_text()
    assert "fused-torch+pw" in md


def test_pass_timings_smoke(tmp_path):
    """benchmarks/passes.py on the CPU stand-ins: every pass of every kernel backend here is
    launched alone and timed; the static report sets such records against its per-pass
    predictions (a pass's kernels summed)."""
    from benchmarks import passes, static
    from conftest import kernel_backends
    rc = passes.main(["--device", "cpu", "--shapes", "2x3x8x8", "--ks", "3", "--layouts",
                      "nchw", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.load(open(next(tmp_path.glob("passes-*.json"))))
    recs = data["records"]
    backends = [b for b in kernel_backends() if b in ("cuda_emu", "triton")]
    assert {(r["backend"], r["pass_"]) for r in recs} == \
        {(b, p) for b in backends for p in passes.PASSES}
    assert all(r["ms"] > 0 and r["ms_p20"] <= r["ms_p80"] for r in recs)
    # per-pass calibration: measured / predicted of each pass, its kernels' sum
    rows = [dict(shape_name="cm1536", dtype="float32", layout="nchw", k=9, modes={},
                 kernels=[dict(backend="triton", pass_="B2", predicted_ms=1.0),
                          dict(backend="triton", pass_="B2", predicted_ms=3.0),
                          dict(backend="triton", pass_="F1", predicted_ms=2.0)])]
    measured = {("cm1536", "float32", "nchw", "B2", 9, "triton"): 8.0,
                ("cm1536", "float32", "nchw", "F1", 9, "triton"): 1.0}
    pairs = {p["key"][3]: p["ratio"] for p in static.compare(rows, measured)}
    assert pairs == {"B2": 2.0, "F1": 0.5}


def test_pass_timings_of_tensor_core_tilings(tmp_path):
    """passes --tc-tilings: triton_tc timed once per tiling, each record naming it; the
    static report's calibration takes the default tiling's only."""
    from benchmarks import passes, static
    from convmixer_ext.backends import backend_reason
    if backend_reason("triton_tc", "cpu") is not None:
        pytest.skip(backend_reason("triton_tc", "cpu"))
    rc = passes.main(["--device", "cpu", "--shapes", "2x3x8x8", "--ks", "3", "--layouts",
                      "nchw", "--dtypes", "bfloat16", "--backends", "triton_tc", "--reps", "1",
                      "--tc-tilings", "1", "2", "--out", str(tmp_path)])
    assert rc == 0
    path = next(tmp_path.glob("passes-*.json"))
    recs = json.load(open(path))["records"]
    assert sorted((r["tiling"], r["pass_"]) for r in recs) == \
        sorted((t, p) for t in ("1", "2") for p in passes.PASSES)
    default = {r["pass_"]: r["ms"] for r in recs if r["tiling"] == "2"}  # DEFAULT_TC_TILING
    got = static._measured([str(path)])
    assert got == {("2x3x8x8", "bfloat16", "nchw", p, 3, "triton_tc"): ms
                   for p, ms in default.items()}


def test_per_kernel_times_average_per_launch():
    """passes --kernels: the profiler's per-kernel totals become the mean time of one launch
    and the launches per step; host-only events (no device time) are left out; older torch
    names the device total cuda_time_total."""
    from types import SimpleNamespace as E

    from benchmarks.passes import per_launch
    events = [E(key="_bwd_dx_kernel", count=5, device_time_total=500.0),
              E(key="_bwd_du_kernel", count=10, device_time_total=300.0),
              E(key="cudaLaunchKernel", count=15, device_time_total=0.0),
              E(key="old_torch_kernel", count=5, cuda_time_total=50.0)]
    assert per_launch(events, launches=5) == {"_bwd_dx_kernel": (100.0, 1.0),
                                              "_bwd_du_kernel": (30.0, 2.0),
                                              "old_torch_kernel": (10.0, 1.0)}


def test_pass_timings_with_the_saved_convolution_output(tmp_path):
    """passes --u both: the passes of every kernel backend timed recomputing the convolution
    and reading F1's saved output, each record saying which. The static report keys the
    saved variant's passes "<pass>/u", its rows likewise (B2's second kernel with its
    first)."""
    from benchmarks import passes, static
    from conftest import kernel_backends
    rc = passes.main(["--device", "cpu", "--shapes", "2x3x8x8", "--ks", "3", "--layouts",
                      "nchw", "--reps", "1", "--u", "both", "--out", str(tmp_path)])
    assert rc == 0
    path = next(tmp_path.glob("passes-*.json"))
    recs = json.load(open(path))["records"]
    want = {("triton", s, p) for s in (False, True) for p in passes.PASSES}
    if "cuda_emu" in kernel_backends():
        want |= {("cuda_emu", s, p) for s in (False, True) for p in passes.PASSES}
    assert {(r["backend"], r["saved_u"], r["pass_"]) for r in recs} == want
    keys = {k[3] for k in static._measured([str(path)]) if k[5] == "triton"}
    assert keys == set(passes.PASSES) | {p + "/u" for p in passes.PASSES}
    rows = [dict(shape_name="cm1536", dtype="bfloat16", layout="nchw", k=9, modes={},
                 kernels=[dict(backend="triton", pass_="B2", u="load", predicted_ms=1.0),
                          dict(backend="triton", pass_="B2", u=None, with_u=True,
                               predicted_ms=3.0),
                          dict(backend="triton", pass_="F1", u="save", predicted_ms=2.0)])]
    measured = {("cm1536", "bfloat16", "nchw", "B2/u", 9, "triton"): 8.0,
                ("cm1536", "bfloat16", "nchw", "F1", 9, "triton"): 1.0}
    assert {p["key"][3]: p["ratio"] for p in static.compare(rows, measured)} == {"B2/u": 2.0}


def test_the_cuda_library_timed_with_and_without_its_prefetches(tmp_path, monkeypatch):
    """The A/B of the L2 prefetches: the "-noprefetch" / "-prefetch" providers run every
    launch of a step (backward too) with them off / on in both layouts, the plain one with
    the library's default (on in NCHW, off in channels_last); passes --prefetch both times
    each pass both ways, records whether they were on, and only the default meets the static
    report's prediction."""
    from benchmarks import passes, static
    from conftest import kernel_backends
    from convmixer_ext._layout import is_channels_last
    from convmixer_ext.cuda_kernels import Launchers
    if "cuda_emu" not in kernel_backends():
        pytest.skip("the emulation library is not built")
    seen = {}
    real = Launchers._prefetch

    def spy(self, x):
        key = (os.environ.get("CONVMIXER_EXT_CUDA_PREFETCH"), is_channels_last(x))
        seen.setdefault(key, set()).add(real(self, x))
        return real(self, x)
    monkeypatch.setattr(Launchers, "_prefetch", spy)
    rc = main(["--quick", "--device", "cpu", "--ks", "3", "--modes", "train_fwdbwd",
               "--layouts", "nchw", "channels_last", "--providers", "cuda_emu",
               "cuda_emu-noprefetch", "cuda_emu-prefetch", "--reps", "1",
               "--out", str(tmp_path / "blocks")])
    assert rc == 0
    assert seen == {(None, False): {True}, (None, True): {False}, ("0", False): {False},
                    ("0", True): {False}, ("1", False): {True}, ("1", True): {True}}, seen
    assert "CONVMIXER_EXT_CUDA_PREFETCH" not in os.environ
    rc = passes.main(["--device", "cpu", "--shapes", "2x3x8x8", "--ks", "3", "--reps", "1",
                      "--backends", "cuda_emu", "--prefetch", "both", "--out", str(tmp_path)])
    assert rc == 0
    path = str(next(tmp_path.glob("passes-*.json")))
    recs = json.load(open(path))["records"]
    assert sorted((r["layout"], r["prefetch"], r["pass_"]) for r in recs) == \
        sorted((lay, f, p) for lay in ("nchw", "channels_last") for f in (False, True)
               for p in passes.PASSES)
    default = {(r["layout"], r["pass_"]): r["ms"] for r in recs
               if r["prefetch"] == (r["layout"] == "nchw")}
    assert static._measured([path]) == \
        {("2x3x8x8", "float32", lay, p, 3, "cuda_emu"): ms for (lay, p), ms in default.items()}
    rc = passes.main(["--device", "cpu", "--shapes", "2x3x8x8", "--ks", "3", "--reps", "1",
                      "--backends", "cuda_emu", "--out", str(tmp_path)])
    assert rc == 0
    assert {(r["layout"], r["prefetch"]) for r in json.load(open(path))["records"]} == \
        {("nchw", True), ("channels_last", False)}


def test_the_cuda_library_timed_on_tensor_cores(tmp_path, monkeypatch):
    """The "-tc" / "-notc" / "-tcall" / "-tcfused" providers run the CUDA library with
    CONVMIXER_EXT_CUDA_TC=1 / 0 / all / all-fused around every call (its F2 / eval then asks
    for tensor cores / not, B2 too with the last two; the plain provider asks as the default
    does), check their
    result against the fp32 reference like every provider, and leave the variable as they
    found it."""
    from conftest import kernel_backends
    from convmixer_ext.cuda_kernels import Launchers
    if "cuda_emu" not in kernel_backends():
        pytest.skip("the emulation library is not built")
    seen = set()
    real = Launchers._tc

    def spy(self):
        seen.add((os.environ.get("CONVMIXER_EXT_CUDA_TC"), real(self)))
        return real(self)
    monkeypatch.setattr(Launchers, "_tc", spy)
    monkeypatch.delenv("CONVMIXER_EXT_CUDA_TC", raising=False)
    out = tmp_path / "blocks"
    rc = main(["--quick", "--device", "cpu", "--ks", "3", "--modes", "eval", "--dtypes",
               "bfloat16", "--layouts", "nchw", "--providers", "cuda_emu", "cuda_emu-tc",
               "cuda_emu-notc", "cuda_emu-tcall", "cuda_emu-tcfused", "--reps", "1", "--out",
               str(out)])
    assert rc == 0
    assert seen == {(None, 1), ("1", 1), ("0", 0), ("all", 2), ("all-fused", 3)}, seen
    assert "CONVMIXER_EXT_CUDA_TC" not in os.environ
    recs = [r for f in out.glob("*.json") for r in json.load(open(f))["records"]
            if r.get("kind") == "block"]
    assert {r["provider"] for r in recs} == {"cuda_emu", "cuda_emu-tc", "cuda_emu-notc",
                                             "cuda_emu-tcall", "cuda_emu-tcfused"}
    assert all("error" not in r and r["ms"] > 0 for r in recs), recs


def test_save_suffix_saves_the_convolution_output_after_any_other():
    """"<provider>-save" runs the provider with save_conv=True, its other suffix (an
    environment setting) kept; on what is not the package's op it is refused."""
    from benchmarks.run import FusedBlock, make_provider, provider_env
    from convmixer_ext.reference import conv_mixer_layer
    ref = conv_mixer_layer(4, 3, "gelu")[0]
    block = make_provider("cuda_emu-tcall-save", ref)
    assert isinstance(block, FusedBlock) and block.save_conv is True
    assert block.backend == "cuda_emu"
    assert provider_env("cuda_emu-tcall-save") == {"CONVMIXER_EXT_CUDA_TC": "all"}
    assert provider_env("cuda-img4") == {"CONVMIXER_EXT_CUDA_TC_IMAGES": "4"}
    assert make_provider("cuda_emu-img2", ref).backend == "cuda_emu"
    assert make_provider("triton-save", ref).save_conv is True
    assert make_provider("triton", ref).save_conv is None
    with pytest.raises(ValueError, match="applies to the package's backends"):
        make_provider("eager-save", ref)


def test_gpu_state_is_sampled_while_a_case_is_timed():
    """GpuMonitor reads the GPU when a timing starts and when it ends (and in between, on
    its thread) and keeps each quantity's range, readings it lacks (None) or that fail left
    out; without NVML it records nothing. The report names the cases whose SM clock fell
    below 95% of the run's highest."""
    from benchmarks.run import GpuMonitor, gpu_state_lines
    readings = iter([(1980.0, 612.5, 51.0), (1755.0, None, 53.0)])
    # (a period longer than any test: the two readings are the start's and the end's)
    with GpuMonitor(read=lambda: next(readings), period_s=3600) as mon:
        assert len(mon.samples) == 1
    assert mon.state == {"sm_clock_mhz": [1755.0, 1980.0], "power_w": [612.5, 612.5],
                         "temp_c": [51.0, 53.0]}
    with GpuMonitor(read=lambda: 1 / 0, period_s=3600) as mon:
        pass
    assert mon.state == {}
    mon = GpuMonitor(read=None)
    mon.read = None  # (as where NVML is missing)
    with mon:
        pass
    assert mon.state == {}
    recs = [dict(dtype="bfloat16", mode="eval", k=k, provider="cuda",
                 gpu_state={"sm_clock_mhz": [lo, 1980.0], "power_w": [300.0, 650.0]})
            for k, lo in ((3, 1500.0), (9, 1970.0))]
    lines = gpu_state_lines(recs + [dict(k=1)])
    assert "SM clock MHz 1500-1980" in lines[1] and "power W 300-650" in lines[1]
    assert lines[2] == "Clock below 95% of the run's highest: bfloat16 eval k=3 cuda (1500 MHz)."
    assert gpu_state_lines([dict(k=1)]) == []
