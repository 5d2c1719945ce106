"""Kernel-size benchmark of the fused depthwise block (docs/DESIGN.md, "Benchmarks").

    python -m benchmarks [--shapes ...] [--ks 3 7 9] [--sweep] [--dtypes ...] [--layouts ...]
                         [--modes ...] [--providers ...] [--model] [--out DIR]

Every case first checks its output against the eager reference block; a wrong result is
recorded as an error, never as a time. Results are written after every case (an
interrupted run keeps what it measured): ``<out>/<device>-<date>.json`` (schema in
benchmarks/README.md), a Markdown table (also printed) and a PNG plot of time vs k.

Without a GPU it runs the honest CPU subset (torch twin vs eager reference, small
shapes), labelled CPU; GPU figures live in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import convmixer_ext
from convmixer_ext import _env, fused_dwconv_block
from convmixer_ext.reference import Residual
from convmixer_ext.semantics import activation_module

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (N, C, H, W): ConvMixer block shapes (tokens after the patch stem)
GPU_SHAPES = {
    "cm1536": (64, 1536, 32, 32),   # ConvMixer-1536/20, 224px / patch 7
    "cm768": (64, 768, 32, 32),     # ConvMixer-768/32
    "cifar256": (128, 256, 16, 16),  # CIFAR ConvMixer-256/8, patch 2
    "cifar256-32": (128, 256, 32, 32),  # CIFAR ConvMixer-256/8, patch 1
    # ConvMixer-768/32 at 448px / patch 7: 2 x 2 tiles of 32 x 32 a plane (where the CUDA
    # tensor-core B2 takes its du pass)
    "cm768-448": (16, 768, 64, 64),
}
CPU_SHAPES = {"cpu-small": (8, 128, 32, 32)}
MODES = ("eval", "train_fwd", "train_fwdbwd")
# Minimum HBM traffic in units of |x| (docs/DESIGN.md, "Forward" and "Backward") and conv passes (k*k FMAs/element).
TRAFFIC = {"eval": 2, "train_fwd": 3, "train_fwdbwd": 8}
CONV_PASSES = {"eval": 1, "train_fwd": 2, "train_fwdbwd": 6}
# FP32 CUDA-core peak (FLOP/s) of known parts; an FMA is 2 FLOPs.
PEAK_FP32 = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40S": 91.6e12}


# --------------------------------------------------------------------------- providers
def reference_block(C, k, activation="gelu"):
    return Residual(nn.Sequential(nn.Conv2d(C, C, k, groups=C, padding="same"),
                                  activation_module(activation), nn.BatchNorm2d(C)))


class FusedBlock(nn.Module):
    """The fused op around a reference block's parameters and buffers; ``save_conv`` as
    :func:`fused_dwconv_block` takes it (None: its default)."""

    def __init__(self, ref: Residual, backend: str, save_conv=None):
        super().__init__()
        self.ref, self.backend, self.save_conv = ref, backend, save_conv

    def forward(self, x):
        dw, bn = self.ref.fn[0], self.ref.fn[2]
        return fused_dwconv_block(x, dw.weight, dw.bias, bn.weight, bn.bias, bn.running_mean,
                                  bn.running_var, bn.num_batches_tracked, self.training,
                                  bn.momentum, bn.eps, "gelu", self.backend,
                                  save_conv=self.save_conv)


# "<backend>-recompute": the backend with save_conv=False (every pass recomputes the
# convolution: the memory-lean setting, beside the default that saves it from k = 7 up);
# "<provider>-save": save_conv=True, at every k, after any other suffix (e.g. cuda-tcall-save:
# the CUDA library's tensor-core F1 and B2, which need the saved output, at k < 7 too)
RECOMPUTE = "-recompute"
SAVE = "-save"
# "<backend>-noprefetch" / "<backend>-prefetch": the CUDA library without / with its L2
# prefetches in either layout (CONVMIXER_EXT_CUDA_PREFETCH=0 / 1 around every call); the
# plain provider takes the library's default, NCHW only (docs/DESIGN.md, "L2 prefetch").
# "<backend>-tc" / "<backend>-notc": the CUDA library with F2 / eval on tensor cores where its
# kernel takes the shape (the default) / on CUDA cores (CONVMIXER_EXT_CUDA_TC=1 / 0;
# docs/DESIGN.md, "CUDA tensor cores"); "<backend>-tcall": training's F1 saving the
# convolution output and B2 reading it too (CONVMIXER_EXT_CUDA_TC=all: opt-in until a GPU
# has timed them; B2's du by a pass of its own where an image has several tiles);
# "<backend>-tcfused": the same with B2 computing du on every tile's halo (=all-fused).
# "<backend>-img2" / "-img4": the tensor-core F2 taking its tile in 2 / 4 images a block, the
# next one's halo loading while one convolves (CONVMIXER_EXT_CUDA_TC_IMAGES; opt-in until a
# GPU has timed it).
PROVIDER_ENV = {"-noprefetch": (_env.PREFETCH_VAR, "0"), "-prefetch": (_env.PREFETCH_VAR, "1"),
                "-tc": (_env.CUDA_TC_VAR, "1"), "-notc": (_env.CUDA_TC_VAR, "0"),
                "-tcall": (_env.CUDA_TC_VAR, "all"), "-tcfused": (_env.CUDA_TC_VAR, "all-fused"),
                "-img2": (_env.CUDA_TC_IMAGES_VAR, "2"), "-img4": (_env.CUDA_TC_IMAGES_VAR, "4")}


def provider_env(name):
    """{variable: value} a provider name asks for around every call (empty: the defaults)."""
    name = name[:-len(SAVE)] if name.endswith(SAVE) else name
    return dict(v for suf, v in PROVIDER_ENV.items() if name.endswith(suf))


@contextlib.contextmanager
def env_vars(settings):
    """The environment variables of ``settings`` ({name: value}) set within."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prefetch_env(value=None):
    """CONVMIXER_EXT_CUDA_PREFETCH set to ``value`` ("0" or "1") within; None: untouched."""
    return env_vars({} if value is None else {_env.PREFETCH_VAR: value})


def make_provider(name, ref):
    if name == "eager":
        return ref
    if name in ("compile", "compile-max"):
        mode = "max-autotune" if name == "compile-max" else None
        return torch.compile(ref, mode=mode)
    if name.endswith(RECOMPUTE):
        return FusedBlock(ref, name[:-len(RECOMPUTE)], save_conv=False)
    if name.endswith(SAVE):
        block = make_provider(name[:-len(SAVE)], ref)
        if not isinstance(block, FusedBlock):
            raise ValueError(f"provider {name!r}: {SAVE!r} applies to the package's backends")
        block.save_conv = True
        return block
    for suffix in PROVIDER_ENV:
        if name.endswith(suffix):
            return FusedBlock(ref, name[:-len(suffix)])
    return FusedBlock(ref, name)


def providers_available(device):
    """eager (the reference block), torch.compile of it (GPU), "auto" (what a user of the
    package gets), each kernel backend available, and the torch twin."""
    av = convmixer_ext.available_backends()
    names = ["eager"]
    if device == "cuda":
        names += ["compile", "compile-max"]
    names.append("auto")
    if device == "cuda":
        names += [b for b in ("cuda", "triton", "triton_tc") if av[b] is True]
    names.append("torch")
    return names


# --------------------------------------------------------------------------- timing
def _timer(fn, device, reps):
    """(median, p20, p80) in ms. GPU: triton.testing.do_bench (warm-up, L2 flush)."""
    if device == "cuda":
        from triton.testing import do_bench
        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in q)
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ts)


def _quantiles(ts):
    """(median, p20, p80) of host timings in ms."""
    ts = sorted(ts)
    pick = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return statistics.median(ts), pick(0.2), pick(0.8)


def copy_bandwidth(device):
    """Bytes/s of a large device copy, measured in this run (roofline denominator)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    med, _, _ = _timer(lambda: b.copy_(a), device, 10)
    return 2 * a.numel() * 4 / (med / 1e3)


def peak_fma_rate(device):
    """FMAs/s of the FP32 CUDA cores (None on the CPU)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FP32.items():
        if key in name:
            return flops / 2
    props = torch.cuda.get_device_properties(0)
    return props.multi_processor_count * 128 * 1.7e9  # 128 FP32 lanes/SM, ~1.7 GHz


def saved_bytes(fn):
    """Bytes of distinct tensors autograd saves during fn()."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except Exception:  # noqa: BLE001 - fake / wrapper tensors
            key = (id(t), t.numel() * t.element_size())
        seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --------------------------------------------------------------------------- one case
def prepare_case(case, device, check_tol):
    """(rec, step, module, x): the provider's module checked against an fp32 eager block on
    the same inputs (a wrong result is recorded in rec["error"], step is then None) and the
    step to time."""
    N, C, H, W = case["shape"]
    k, dtype, layout, mode, prov = (case["k"], getattr(torch, case["dtype"]), case["layout"],
                                    case["mode"], case["provider"])
    rec = dict(case, shape=list(case["shape"]), device=device)
    torch.manual_seed(0)
    ref = reference_block(C, k).to(device=device, dtype=dtype)
    golden = reference_block(C, k).to(device=device, dtype=torch.float32)
    golden.load_state_dict(ref.state_dict())
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ref = ref.to(memory_format=mf)
    x = torch.randn(N, C, H, W, device=device, dtype=dtype).to(memory_format=mf)
    module = make_provider(prov, ref)
    env_ctx = functools.partial(env_vars, provider_env(prov))
    train = mode != "eval"
    module.train(train)
    golden.train(train)
    probe = torch.randn_like(x)

    # correctness first (one step, fp32 golden reference on the same inputs): the output,
    # and for fwd+bwd the input gradient too
    grads = mode == "train_fwdbwd"
    xr = x.detach().clone().requires_grad_(grads)
    xg = x.float().detach().clone().requires_grad_(grads)
    with env_ctx():
        out, gx = module(xr), golden(xg)
        if grads:
            out.backward(probe)
            gx.backward(probe.float())
    checks = [("output", out, gx)]
    if grads:
        checks.append(("x.grad", xr.grad, xg.grad))
    for what, got, want in checks:
        err = (got.float() - want).abs().max().item()
        if not math.isfinite(err) or err > check_tol[case["dtype"]] * max(want.abs().max().item(), 1.0):
            rec["error"] = f"{what} mismatch vs eager reference: max abs err {err:.3g}"
            return rec, None, module, x

    def step():
        xi = x.detach().requires_grad_(mode == "train_fwdbwd")
        with env_ctx():
            if mode == "eval":
                with torch.no_grad():
                    return module(xi)
            o = module(xi)
            if mode == "train_fwdbwd":
                o.backward(probe)
            return o

    return rec, step, module, x


def finish_case(rec, times, step, module, x, bw, fma_rate):
    """rec with the times (median, p20, p80 in ms) and the derived figures."""
    mode, k, device = rec["mode"], rec["k"], rec["device"]
    med, p20, p80 = times
    numel = x.numel()
    bytes_min = TRAFFIC[mode] * numel * x.element_size()
    fmas = CONV_PASSES[mode] * numel * k * k
    t_bytes = bytes_min / bw
    t_fma = fmas / fma_rate if fma_rate else 0.0
    rec.update(ms=med, ms_p20=p20, ms_p80=p80, bytes_min=bytes_min, fmas=fmas,
               gbps=bytes_min / (med / 1e3) / 1e9,
               roofline_ms=max(t_bytes, t_fma) * 1e3,
               pct_roofline=100 * max(t_bytes, t_fma) / (med / 1e3))
    if mode == "train_fwdbwd":
        rec["saved_bytes"] = saved_bytes(lambda: module(x.detach().requires_grad_()))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    return rec


def run_case(case, device, reps, bw, fma_rate, check_tol):
    rec, step, module, x = prepare_case(case, device, check_tol)
    if step is None:
        return rec
    if device != "cuda":
        return finish_case(rec, _timer(step, device, reps), step, module, x, bw, fma_rate)
    torch.cuda.synchronize()
    with GpuMonitor(torch.cuda.current_device()) as mon:
        times = _timer(step, device, reps)
    if mon.state:
        rec["gpu_state"] = mon.state
    return finish_case(rec, times, step, module, x, bw, fma_rate)


class GpuMonitor:
    """What the GPU did while a case was timed: its SM clock (MHz), power draw (W) and
    temperature (C), read through NVML when the timing starts, every ``period_s`` while it
    runs (a thread) and when it ends, kept as ``state`` = {quantity: [min, max]} (empty
    without NVML). A clock or power limit that moves between cases shows here, not in the
    times alone. ``read``: a function returning (clock, power, temperature), each None where
    unknown (default: :func:`nvml_reader`'s)."""
    KEYS = ("sm_clock_mhz", "power_w", "temp_c")

    def __init__(self, index=0, read=None, period_s=0.02):
        self.read = read if read is not None else nvml_reader(index)
        self.period_s, self.samples, self.state = period_s, [], {}
        self._stop, self._thread = None, None

    def _sample(self):
        try:
            self.samples.append(self.read())
        except Exception:  # noqa: BLE001 - a reading that fails is left out
            pass

    def _loop(self):
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self):
        if self.read is None:
            return self
        import threading
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        values = {k: [s[i] for s in self.samples if s[i] is not None]
                  for i, k in enumerate(self.KEYS)}
        self.state = {k: [min(v), max(v)] for k, v in values.items() if v}
        return False


@functools.lru_cache(maxsize=None)
def nvml_reader(index):
    """A function reading (SM clock MHz, power W, temperature C) of CUDA device ``index``
    through NVML (the nvidia-ml-py package), or None where NVML or the mapping from CUDA's
    index to NVML's is missing (only the identity, when CUDA sees every GPU, is trusted).
    Made once per device: NVML is initialised once per run, not once per case."""
    try:
        import pynvml
        pynvml.nvmlInit()
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or \
                pynvml.nvmlDeviceGetCount() != torch.cuda.device_count():
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - no NVML: no readings
        return None

    def read():
        return (float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)))
    return read


def run_group(cases, device, reps, bw, fma_rate, check_tol):
    """The providers of one case timed side by side: on the CPU their steps alternate, rep by
    rep, so the machine's drift (frequency, other load) hits every provider alike and the
    ratios between them are what one run can measure."""
    prepared = [prepare_case(c, device, check_tol) for c in cases]
    live = [p for p in prepared if p[1] is not None]
    times = {id(p[1]): [] for p in live}
    for _, step, _, _ in live:
        step()  # warm-up
    for _ in range(reps):
        for _, step, _, _ in live:
            t0 = time.perf_counter()
            step()
            times[id(step)].append((time.perf_counter() - t0) * 1e3)
    out = []
    for rec, step, module, x in prepared:
        if step is None:
            out.append(rec)
            continue
        out.append(finish_case(rec, _quantiles(times[id(step)]), step, module, x, bw,
                               fma_rate))
    return out


# --------------------------------------------------------------------------- whole model
def run_model(device, dtype, ks, reps, quick, emit=None):
    """Images/s of a training step (fwd + bwd + SGD step) and of inference, per provider.
    ``emit(record)`` is called as each one is measured (an interrupted run keeps them)."""
    from convmixer_ext import convert
    from convmixer_ext.reference import ConvMixer as RefConvMixer
    if device == "cuda":
        configs = {"ConvMixer-1536/20": (1536, 20, 7, 224, 64),
                   "ConvMixer-256/8 CIFAR": (256, 8, 2, 32, 128)}
    else:
        configs = {"ConvMixer-64/2 (CPU, tiny)": (64, 2, 2, 32, 8)}
    if quick:
        configs = dict(list(configs.items())[-1:])
    recs = []
    for name, (dim, depth, patch, img, batch) in configs.items():
        for k in ks:
            torch.manual_seed(0)
            ref = RefConvMixer(dim, depth, k, patch, 1000).to(device=device, dtype=dtype)
            provs = {"eager": ref}
            if device == "cuda":
                provs["compile"] = torch.compile(ref)
            # "auto": what convert() gives by default (on the CPU: PyTorch's own ops);
            # the fused depthwise block with the pointwise half unfused / fused (+pw: BN2
            # folded into the next layer's depthwise load; on the CPU the twin's)
            variants = [("auto", "auto", "unfused")] + (
                [("fused-auto+pw", "auto", "auto")] if device == "cuda" else
                [("fused-torch", "torch", "unfused"), ("fused-torch+pw", "torch", "torch")])
            for pname, bk, pw in variants:
                m = convert(RefConvMixer(dim, depth, k, patch, 1000), backend=bk, pointwise=pw)
                m.load_state_dict(ref.state_dict())
                provs[pname] = m.to(device=device, dtype=dtype)
            x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
            y = torch.randint(0, 1000, (batch,), device=device)
            for pname, model in provs.items():
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)

                def train_step():
                    model.train()
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()

                def infer():
                    model.eval()
                    with torch.no_grad():
                        model(x)

                t_train = _timer(train_step, device, reps)[0]
                t_inf = _timer(infer, device, reps)[0]
                recs.append(dict(kind="model", model=name, k=k, provider=pname, batch=batch,
                                 dtype=str(dtype)[6:], device=device,
                                 train_img_s=batch / (t_train / 1e3),
                                 infer_img_s=batch / (t_inf / 1e3)))
                if pname != "compile":  # what autograd keeps for backward (exact, any device)
                    def train_forward():
                        model.train()
                        model(x)
                    recs[-1]["train_saved_bytes"] = saved_bytes(train_forward)
                if device == "cuda":  # activation memory of one training step
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    train_step()
                    torch.cuda.synchronize()
                    recs[-1]["train_peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
                print(f"  {name} k={k} {pname}: train {recs[-1]['train_img_s']:.1f} img/s, "
                      f"infer {recs[-1]['infer_img_s']:.1f} img/s", flush=True)
                if emit is not None:
                    emit(recs[-1])
    return recs


# --------------------------------------------------------------------------- output
def environment(device):
    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               device=device, torch=torch.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), host=platform.node(),
               convmixer_ext=convmixer_ext.__version__,
               backends={k: (v if v is True else str(v)) for k, v in
                         convmixer_ext.available_backends().items()})
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE,
                                           capture_output=True, text=True).stdout.strip()
    except OSError:
        env["git_commit"] = None
    # the commit the installed package was built from (a wheel built elsewhere: the
    # checkout's HEAD above need not be the code that ran)
    from convmixer_ext import _build_info
    env["package_commit"] = getattr(_build_info, "COMMIT", None)
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()}, " \
                             f"{os.cpu_count()} cores)"
    return env


def markdown(env, records):
    lines = [f"# Fused depthwise block — {env['device_name']}",
             "", f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"commit {str(env.get('git_commit'))[:10]} (package built from "
             f"{str(env.get('package_commit'))[:16]}), {env['date']}"]
    if env["device"] != "cuda":
        lines += ["", "**CPU figures** (no GPU here): the package's auto and its twin vs "
                  "the eager reference on small shapes, timed side by side; they say nothing "
                  "about GPU kernel speed. GPU results: benchmarks/results/."]
    lines += ["", "| shape | dtype | layout | mode | k | provider | ms (p20-p80) | GB/s | "
              "% roofline | vs eager | vs compile | saved for bwd | peak mem |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in records:
        if r.get("kind") == "block" and "ms" in r:
            base[(r["shape_name"], r["dtype"], r["layout"], r["mode"], r["k"], r["provider"])] = r["ms"]
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else ""  # noqa: E731
    for r in records:
        if r.get("kind") != "block":
            continue
        key = (r["shape_name"], r["dtype"], r["layout"], r["mode"], r["k"])
        head = f"| {r['shape_name']} | {r['dtype']} | {r['layout']} | {r['mode']} | {r['k']} | {r['provider']} |"
        if "error" in r:
            lines.append(head + f" ERROR: {r['error']} |||||||")
            continue
        e, c = base.get(key + ("eager",)), base.get(key + ("compile",))
        ratio = lambda b: f"{b / r['ms']:.2f}x" if b else "—"  # noqa: E731
        roof = f"{r['pct_roofline']:.0f}%" if env["device"] == "cuda" else "—"
        lines.append(head + f" {r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
                     f"{r['gbps']:.0f} | {roof} | {ratio(e)} | {ratio(c)} | "
                     f"{mib(r.get('saved_bytes'))} | {mib(r.get('peak_mem_bytes'))} |")
    lines += gpu_state_lines(records)
    models = [r for r in records if r.get("kind") == "model"]
    if models:
        lines += ["", "| model | k | provider | batch | train img/s | inference img/s | "
                  "saved for backward | train step peak memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in models:
            lines.append(f"| {r['model']} | {r['k']} | {r['provider']} | {r['batch']} | "
                         f"{r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | "
                         f"{mib(r.get('train_saved_bytes'))} | "
                         f"{mib(r.get('train_peak_mem_bytes'))} |")
    return "\n".join(lines) + "\n"


def gpu_state_lines(records):
    """The GPU's SM clock, power and temperature over the timed cases (GpuMonitor), and the
    cases whose clock fell below 95% of the run's highest: [] without samples."""
    states = [(r, r["gpu_state"]) for r in records if r.get("gpu_state")]
    if not states:
        return []
    span = lambda key: [f(s[key][i] for _, s in states if key in s)  # noqa: E731
                        for i, f in ((0, min), (1, max))] if any(key in s for _, s in states) \
        else None
    lines = ["", "While timed (NVML, every 20 ms): "
             + ", ".join(f"{name} {lo:.0f}-{hi:.0f}" for name, key in
                         (("SM clock MHz", "sm_clock_mhz"), ("power W", "power_w"),
                          ("temperature C", "temp_c"))
                         if (v := span(key)) for lo, hi in [v]) + "."]
    clock = span("sm_clock_mhz")
    if clock:
        low = [f"{r['dtype']} {r['mode']} k={r['k']} {r['provider']} "
               f"({s['sm_clock_mhz'][0]:.0f} MHz)" for r, s in states
               if "sm_clock_mhz" in s and s["sm_clock_mhz"][0] < 0.95 * clock[1]]
        lines.append("Clock below 95% of the run's highest: " + ("; ".join(low) or "none")
                     + ".")
    return lines


def plot(env, records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    groups = {}
    for r in records:
        if r.get("kind") == "block" and "ms" in r:
            groups.setdefault((r["shape_name"], r["dtype"], r["layout"], r["mode"]), []).append(r)
    if not groups:
        return
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, rs) in zip(axes.flat, sorted(groups.items())):
        for prov in sorted({r["provider"] for r in rs}):
            pts = sorted((r["k"], r["ms"]) for r in rs if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        roof = sorted({(r["k"], r["roofline_ms"]) for r in rs})
        if env["device"] == "cuda":
            ax.plot([p[0] for p in roof], [p[1] for p in roof], "k--", label="roofline")
        ax.set_title(" ".join(map(str, key)), fontsize=9)
        ax.set_xlabel("kernel size k")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"fused depthwise block: time vs kernel size — {env['device_name']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", help="shape names (%s) or NxCxHxW" %
                   ", ".join(list(GPU_SHAPES) + list(CPU_SHAPES)))
    p.add_argument("--ks", nargs="+", type=int, default=[3, 7, 9])
    p.add_argument("--sweep", action="store_true", help="add k = 3, 5, ..., 31")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"])
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--providers", nargs="+",
                   help="eager, compile, compile-max, cuda, triton, triton_tc (16-bit dtypes), "
                        "torch (default: available); cuda-recompute, triton-recompute, "
                        "triton_tc-recompute: "
                        "with save_conv=False; cuda-noprefetch, cuda-prefetch: the CUDA library "
                        "without / with its L2 prefetches in both layouts (plain: NCHW only); "
                        "cuda-tc, cuda-notc: the CUDA library's F2 / eval on tensor cores "
                        "(16-bit NCHW; plain: the same) / on CUDA cores; cuda-tcall: its "
                        "training F1 and B2 too; cuda-tcfused: B2 computing du on every "
                        "tile's halo; cuda-img2, cuda-img4: its tensor-core F2 taking a "
                        "tile in 2 / 4 images a block; <provider>-save: save_conv=True")
    p.add_argument("--model", action="store_true", help="also time whole-model steps")
    p.add_argument("--no-blocks", action="store_true", help="skip the block benchmark")
    p.add_argument("--reps", type=int, default=None, help="CPU timing repetitions")
    p.add_argument("--quick", action="store_true", help="smallest set (CI smoke run)")
    p.add_argument("--no-predicted", action="store_true",
                   help="without a GPU, skip the predicted H100 table (static report)")
    p.add_argument("--static-ks", nargs="+", type=int, default=[3, 5, 7, 9, 15, 31],
                   help="kernel sizes of the predicted table and plot")
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    return p.parse_args(argv)


def _case_key(c):
    return tuple(c[k] for k in ("shape_name", "dtype", "layout", "mode", "k"))


def _shape(s):
    table = {**GPU_SHAPES, **CPU_SHAPES}
    if s in table:
        return s, table[s]
    dims = tuple(int(v) for v in s.lower().split("x"))
    if len(dims) != 4:
        raise SystemExit(f"--shapes: {s!r} is neither a known name nor NxCxHxW")
    return s, dims


def main(argv=None):
    a = parse(argv)
    dev = a.device
    gpu = dev == "cuda"
    if not gpu:
        print("No GPU: running the honest CPU subset (the package's auto and its twin vs the "
              "eager reference, small shapes). These are CPU figures; GPU results are "
              "committed under benchmarks/results/. The predicted H100 table follows them.",
              flush=True)
    shapes = [_shape(s) for s in (a.shapes or (list(GPU_SHAPES)[:3] if gpu else list(CPU_SHAPES)))]
    if a.quick and not a.shapes:
        shapes = [("tiny", (2, 8, 8, 8))]
    ks = sorted(set(a.ks + (list(range(3, 32, 2)) if a.sweep else [])))
    dtypes = a.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    layouts = a.layouts or (["nchw", "channels_last"] if gpu else ["nchw"])
    modes = a.modes or (list(MODES) if gpu else ["eval", "train_fwdbwd"])
    provs = a.providers or providers_available(dev)
    reps = a.reps or (3 if a.quick else 10 if gpu else 30)
    check_tol = {"float32": 1e-3, "bfloat16": 6e-2, "float16": 1e-2}

    os.makedirs(a.out, exist_ok=True)
    env = environment(dev)
    tag = env["device_name"].split("(")[0].strip().replace(" ", "_") or dev
    stem = os.path.join(a.out, f"{tag}-{_dt.date.today().isoformat()}"
                        + ("-model" if a.no_blocks else ""))
    env["copy_GBps"] = copy_bandwidth(dev) / 1e9
    fma_rate = peak_fma_rate(dev)
    env["peak_fma_per_s"] = fma_rate
    records = []

    def save():
        with open(stem + ".json", "w") as f:
            json.dump({"schema": 1, "environment": env, "records": records}, f, indent=1)

    cases = [dict(kind="block", shape_name=sn, shape=shp, k=k, dtype=dt, layout=lay, mode=m,
                  provider=p)
             for sn, shp in shapes for dt in dtypes for lay in layouts for m in modes
             for k in ks for p in provs
             if not (p.startswith("triton_tc") and dt == "float32")] if not a.no_blocks else []
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    # on the CPU the providers of a case are timed side by side (run_group); on a GPU one
    # at a time (do_bench flushes L2 between runs)
    groups = [[c] for c in cases] if gpu else \
        [[c for c in cases if _case_key(c) == key] for key in dict.fromkeys(map(_case_key, cases))]
    try:
        for group in (tqdm(groups, desc="cases", file=sys.stdout, mininterval=2)
                      if tqdm else groups):
            try:
                if gpu:
                    records.append(run_case(group[0], dev, reps, env["copy_GBps"] * 1e9,
                                            fma_rate, check_tol))
                else:
                    records.extend(run_group(group, dev, reps, env["copy_GBps"] * 1e9,
                                             fma_rate, check_tol))
            except Exception as e:  # noqa: BLE001 - reported per case, the run goes on
                records.extend(dict(c, shape=list(c["shape"]), device=dev,
                                    error=f"{type(e).__name__}: {str(e)[:300]}") for c in group)
            save()
        if a.model:
            def emit(rec):
                records.append(rec)
                save()
            run_model(dev, getattr(torch, dtypes[0]), ks if not a.quick else ks[:1], reps,
                      a.quick or not gpu, emit)
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the cases measured so far", flush=True)
    save()
    md = markdown(env, records)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(env, records, stem + ".png")
    print(md)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    if not gpu:
        print("GPU results: see benchmarks/results/ (and the README's headline table).")
        if not a.quick and not a.no_predicted:
            predicted(a.out, a.static_ks)
    errors = [r for r in records if "error" in r]
    return 1 if errors else 0


def predicted(out, ks):
    """The static report's PREDICTED H100 table and its plot of predicted time against k,
    per backend and for eager (compiled facts + the model; no GPU needed)."""
    print("\n== PREDICTED (no GPU here): the static report, H100 SXM, +-50% ==", flush=True)
    stem = os.path.join(out, "predicted-H100")
    try:
        from benchmarks import static
        static.main(["--shapes", "cm1536", "--ks", *map(str, ks), "--json", stem + ".json",
                     "--md", stem + ".md", "--png", stem + ".png"])
        print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the CPU figures stand alone
        print(f"no predicted table: {type(e).__name__}: {e}")
