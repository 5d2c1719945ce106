"""Per-pass times of the kernel backends (docs/DESIGN.md, "Forward" and "Backward"): F1
(statistics), F2 (apply / eval), B1 (dbeta, dgamma) and B2 (dx, dW, db) of one block, each
launched alone through the backend's launchers, so that the static report's per-kernel
predictions can be set against a measurement pass by pass (the block benchmark times whole
steps).

    python -m benchmarks.passes [--shapes cm1536] [--ks 3 9] [--dtypes bfloat16 float32]
                                [--layouts nchw channels_last]
                                [--backends cuda triton triton_tc] [--kernels]
                                [--tc-tilings 1 2 2w] [--u both] [--prefetch both]
                                [--out DIR]
    python -m benchmarks.static --measured <this JSON> ...   # per-pass calibration

GPU: ``triton.testing.do_bench`` (warm-up, L2 flush, median). Without a GPU it times the
CPU stand-ins (the emulator, the interpreter) at the given shape: only a smoke run, whose
figures say nothing about GPU speed. ``--kernels`` (GPU) also records each kernel a pass
launches, with its mean time under the CUDA profiler (kind "kernel": ..., pass_, kernel,
us, calls per pass), so that a pass of several kernels (B2: dx and dW) splits.
``--tc-tilings`` times triton_tc in each tensor-core tiling
(``triton_kernels.tensor_core_tiling``). ``--u``: F1 saving the convolution output for the
later passes (default: as the op decides; recompute, saved, both). ``--prefetch``: the
CUDA library's L2 prefetches as it decides (default: NCHW only), on, off, or on and off. Writes
``<out>/passes-<device>-<date>.json`` (records of kind "pass": shape_name, shape, dtype,
layout, k, backend, pass_, ms, ms_p20, ms_p80, tiling: triton_tc's, null for the other
backends; saved_u; prefetch).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import sys

import torch

from benchmarks.run import HERE, _shape, _timer, environment, prefetch_env
from convmixer_ext._cmx_lib import PASSES
from convmixer_ext.backends import (SAVES_U_BACKENDS, backend_reason, get_impl,
                                    saves_conv_output)
from convmixer_ext.semantics import ACTIVATIONS, rstd_from_var


def _inputs(shape, dtype, layout, k, device):
    N, C, H, W = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = r(N, C, H, W).to(dtype).contiguous(memory_format=mf)
    dout = r(N, C, H, W).to(dtype).contiguous(memory_format=mf)
    w, b = (r(C, 1, k, k) / k).to(dtype), (0.1 * r(C)).to(dtype)
    vec = dict(gamma=1 + 0.1 * r(C), beta=0.1 * r(C), mean=0.1 * r(C),
               rstd=rstd_from_var(1 + r(C).abs(), 1e-5), dbeta=r(C), dgamma=r(C))
    return x, dout, w, b, vec


def pass_steps(impl, x, dout, w, b, v, act, saved_u=False):
    """{pass: a callable launching that pass's kernels once} (the launcher contract of
    backends.KernelBackend; no reduction of the partials: the kernels alone). ``saved_u``:
    F1 saves the convolution output, F2, B1 and B2 read it."""
    k = impl.k
    u = dict(u=torch.empty_like(x, dtype=torch.float32)) if saved_u else {}
    if saved_u:
        k.k_stats(x, w, b, None, None, act, **u)  # what the later passes read
    return {
        "F1": lambda: k.k_stats(x, w, b, None, None, act, **u),
        "F2": lambda: k.k_apply(x, w, b, v["mean"], v["rstd"], v["gamma"], v["beta"], None,
                                None, act, **u),
        "B1": lambda: k.k_bwd_reduce(dout, x, w, b, v["mean"], v["rstd"], None, None, act,
                                     **u),
        "B2": lambda: k.k_bwd_main(dout, x, w, b, v["mean"], v["rstd"], v["gamma"],
                                   v["dbeta"], v["dgamma"], True, None, None, act, **u),
    }


def _u_variants(be, k, choice):
    """[saved_u]: the convolution output saved or not, as ``choice`` says ("default": as
    the op decides, backends.saves_conv_output; "recompute", "saved", "both"), where the
    backend can save it."""
    if be not in SAVES_U_BACKENDS:
        return [False]
    return {"default": [saves_conv_output(be, k, True)], "recompute": [False],
            "saved": [True], "both": [False, True]}[choice]


def kernel_times(step, launches=5):
    """{kernel name: (mean us per launch, launches per step)} of ``launches`` runs of
    ``step`` under the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(launches):
            step()
        torch.cuda.synchronize()
    return per_launch(prof.key_averages(), launches)


def per_launch(events, launches):
    """{name: (mean us per launch, launches per step)} of profiler averages (``key``,
    ``count`` and the device time, ``device_time_total`` or, in older torch,
    ``cuda_time_total``), events without device time left out."""
    out = {}
    for e in events:
        total = getattr(e, "device_time_total", None)
        if total is None:
            total = getattr(e, "cuda_time_total", 0)
        if total > 0 and e.count:
            out[e.key] = (total / e.count, e.count / launches)
    return out


_PREFETCH_ENV = {"default": None, "on": "1", "off": "0"}


def _variants(be, tilings, layout, prefetch=("default",)):
    """[(tiling, prefetch, context)]: triton_tc in each tensor-core tiling, the CUDA
    library with its L2 prefetches as ``prefetch`` lists ("default", "on", "off"; prefetch:
    whether they are on, in ``layout``), every other backend once."""
    if be == "triton_tc":
        from convmixer_ext import triton_kernels as tk
        return [(t, None, functools.partial(tk.tensor_core_tiling, t))
                for t in (tilings or (tk.DEFAULT_TC_TILING,))]
    if be in ("cuda", "cuda_emu"):
        from convmixer_ext.cuda_kernels import default_prefetch
        return [(None, default_prefetch(layout == "channels_last") if p == "default"
                 else p == "on", functools.partial(prefetch_env, _PREFETCH_ENV[p]))
                for p in prefetch]
    return [(None, None, contextlib.nullcontext)]


def run(shapes, ks, dtypes, layouts, backends, device, reps, save=lambda records: None,
        kernels=False, tilings=None, u_choice="default", prefetch=("default",)):
    """Time every pass; ``save(records)`` after each backend's four passes (an interrupted
    run keeps what it measured); triton_tc in each tensor-core tiling (records' "tiling");
    the convolution output saved or not as ``u_choice`` says (records' "saved_u"); the CUDA
    library's prefetches as ``prefetch`` lists ("default", "on", "off"; records' "prefetch":
    whether they were on)."""
    records = []
    for sname, shape in shapes:
        for dtype in dtypes:
            for layout in layouts:
                for k in ks:
                    x, dout, w, b, v = _inputs(shape, getattr(torch, dtype), layout, k, device)
                    for be in backends:
                        if backend_reason(be, device) is not None or \
                                (be == "triton_tc" and dtype == "float32"):
                            continue
                        for saved_u, tiling, pf, ctx in [
                                (s_u, t, f, c) for s_u in _u_variants(be, k, u_choice)
                                for t, f, c in _variants(be, tilings, layout, prefetch)]:
                            with ctx():
                                steps = pass_steps(get_impl(be), x, dout, w, b, v,
                                                   ACTIVATIONS["gelu"], saved_u)
                            tag = (f" tiling {tiling}" if tiling else "") + \
                                (" saved u" if saved_u else "") + \
                                {True: " prefetch", False: " no prefetch"}.get(pf, "")
                            for name, step in steps.items():
                                with ctx():
                                    step()  # compile / warm up
                                    med, p20, p80 = _timer(step, device, reps)
                                    kt = kernel_times(step) if kernels and device == "cuda" \
                                        else {}
                                records.append(dict(kind="pass", shape_name=sname,
                                                    shape=list(shape), dtype=dtype,
                                                    layout=layout, k=k, backend=be,
                                                    pass_=name, ms=med, ms_p20=p20,
                                                    ms_p80=p80, device=device, tiling=tiling,
                                                    saved_u=saved_u, prefetch=pf))
                                print(f"{sname} {dtype} {layout} k={k} {be}{tag} {name}: "
                                      f"{med:.3f} ms", flush=True)
                                for kname, (us, calls) in kt.items():
                                    records.append(dict(kind="kernel", shape_name=sname,
                                                        dtype=dtype, layout=layout, k=k,
                                                        backend=be, pass_=name, kernel=kname,
                                                        us=us, calls=calls, tiling=tiling,
                                                        saved_u=saved_u, prefetch=pf))
                                    print(f"    {kname[:60]}: {us:.1f} us x {calls:g}",
                                          flush=True)
                        save(records)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.passes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--ks", nargs="+", type=int, default=[3, 9])
    p.add_argument("--dtypes", nargs="+", default=None,
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"],
                   choices=["nchw", "channels_last"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="kernel backends (default: cuda triton triton_tc on a GPU, "
                        "cuda_emu triton on the CPU)")
    p.add_argument("--reps", type=int, default=3, help="CPU timing repetitions")
    p.add_argument("--kernels", action="store_true",
                   help="also each kernel's time under the CUDA profiler (GPU only)")
    p.add_argument("--tc-tilings", nargs="+", default=None, metavar="SPEC",
                   help="triton_tc in each of these tilings (1, 2, 4, 2w, 4w: images per "
                        "program and warps, triton_kernels.tensor_core_tiling; default: "
                        "its default, DEFAULT_TC_TILING)")
    p.add_argument("--u", default="default", choices=["default", "recompute", "saved", "both"],
                   help="F1 saving the convolution output for F2, B1, B2: "
                        "as the op decides by default, never, always, or each way")
    p.add_argument("--prefetch", default="default", choices=["default", "on", "off", "both"],
                   help="the CUDA library's L2 prefetches: its default (NCHW only), on, off, "
                        "or on and off")
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    shapes = [_shape(s) for s in (a.shapes or (["cm1536"] if gpu else ["2x4x8x8"]))]
    backends = a.backends or (["cuda", "triton", "triton_tc"] if gpu else ["cuda_emu", "triton"])
    dtypes = a.dtypes or (["bfloat16", "float32"] if gpu else ["float32"])
    env = environment(a.device)
    tag = env["device_name"].split("(")[0].strip().replace(" ", "_") or a.device
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"passes-{tag}-{_dt.date.today().isoformat()}.json")

    def save(records):
        with open(path, "w") as f:
            json.dump({"schema": 1, "environment": env, "records": records}, f, indent=1)

    try:
        records = run(shapes, a.ks, dtypes, a.layouts, backends, a.device, a.reps, save,
                      kernels=a.kernels, tilings=a.tc_tilings, u_choice=a.u,
                      prefetch=["on", "off"] if a.prefetch == "both" else [a.prefetch])
    except KeyboardInterrupt:
        print("interrupted: keeping the passes timed so far", flush=True)
        return 1
    print(f"wrote {path}")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
