"""Self-check: ``python -m convmixer_ext``.

Prints the versions (Python, torch, triton, CUDA), the compiled libraries and their
architectures, the devices, each backend's availability (or the reason it is not), what
``"auto"`` picks, and the result of a tiny correctness probe of every backend that runs on
the device at hand (one training step of a fused layer against the reference layer, in
float64: output, input and parameter gradients). Exits 1 if a probe fails.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys

import torch


def _versions():
    lines = [f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines[0] += f", triton {triton.__version__}"
    except Exception as e:  # noqa: BLE001
        lines[0] += f", triton not importable ({type(e).__name__})"
    return lines


def _libraries():
    from . import backends
    lines = []
    for kind in ("cuda", "emulation"):
        lib, why = backends.library(kind)
        if lib is None:
            lines.append(f"{kind} library: {why}")
            continue
        extra = f" for {', '.join(lib.archs)} (CUDA {lib.build_info.get('cuda')})" \
            if kind == "cuda" else ""
        lines.append(f"{kind} library: {lib.path}{extra}")
    from . import _env
    try:
        state = {None: "NCHW only (the default; channels_last runs faster without)",
                 True: f"on ({_env.PREFETCH_VAR}=1)",
                 False: f"off ({_env.PREFETCH_VAR}=0)"}[_env.cuda_prefetch()]
    except ValueError as e:  # the kernel libraries' launches will refuse it too
        state = str(e)
    lines.append(f"kernel library L2 prefetch: {state}")
    try:
        from .cuda_kernels import TC_MAX_KERNEL_SIZE
        level = _env.cuda_tensor_cores()
        tc = [f"off ({_env.CUDA_TC_VAR}=0)",
              f"on (the default: F2 / eval of 16-bit NCHW, k <= {TC_MAX_KERNEL_SIZE}; "
              f"{_env.CUDA_TC_VAR}=0 turns it off, =all adds training's F1 and B2)",
              f"F2, F1 and B2 ({_env.CUDA_TC_VAR}=all: training's F1 saving the "
              f"convolution output and B2 reading it, 16-bit NCHW; B2's du by a pass of its "
              f"own where an image has several tiles)",
              f"F2, F1 and B2, B2 computing du on every tile's halo "
              f"({_env.CUDA_TC_VAR}=all-fused)"][level]
    except ValueError as e:
        tc = str(e)
    lines.append(f"kernel library tensor cores: {tc}")
    return lines


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            devs.append(f"cuda:{i} {torch.cuda.get_device_name(i)} "
                        f"(compute capability {cap[0]}.{cap[1]})")
    return devs


# a probe's bound: well above the dtype's rounding of one layer step (fp32 errors are ~1e-7,
# bf16 ones ~1e-2: 8-bit mantissas through conv, BN and their gradients), far below a bug's
PROBE_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.1}


def probe(backend: str, device: str, dtype=torch.float32):
    """Max relative errors of one training step of a fused layer on ``backend`` against the
    float64 reference layer: {"out": e, "x.grad": e, "params": e}."""
    from .modules import ConvMixerLayer
    from .reference import conv_mixer_layer
    torch.manual_seed(0)
    ref = conv_mixer_layer(8, 7, "gelu")
    fused = ConvMixerLayer(8, 7, "gelu", backend=backend)
    fused.load_state_dict(ref.state_dict())
    fused = fused.to(device=device, dtype=dtype)
    ref = copy.deepcopy(ref).double()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    probe_grad = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(), x.to(device, dtype).requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    out_r.backward(probe_grad)
    out_f.backward(probe_grad.to(device, dtype))

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()

    params = max(rel(pf.grad, pr.grad) for pf, pr in zip(fused.parameters(), ref.parameters()))
    return {"out": rel(out_f, out_r), "x.grad": rel(xf.grad, xr.grad), "params": params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convmixer_ext", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    import convmixer_ext
    from .backends import BACKENDS, backend_reason, resolve_backend
    print(f"convmixer-ext {convmixer_ext.__version__}")
    for line in _versions() + _libraries():
        print(line)
    print("devices: " + "; ".join(_devices()))
    print("backends (on any device here):")
    for name in BACKENDS:
        why = backend_reason(name)
        print(f"  {name:9s} {'available' if why is None else why}")
    dev = torch.device(a.device)
    picks = {op: resolve_backend("auto", dev, torch.float32, 9, op=op)
             for op in ("depthwise", "pointwise")}
    print(f"auto on {dev} (float32, k=9): depthwise -> {picks['depthwise']}, "
          f"pointwise -> {picks['pointwise']}")
    print(f"probe on {dev}: one training step of ConvMixerLayer(8, k=7), float32 (triton_tc: "
          f"bfloat16), vs the float64 reference (max relative error)")
    failed = 0
    for name in BACKENDS:
        why = backend_reason(name, dev)
        if why is not None:
            print(f"  {name:9s} skipped: {why}")
            continue
        dtype = torch.bfloat16 if name == "triton_tc" else torch.float32
        try:
            errs = probe(name, a.device, dtype)
        except Exception as e:  # noqa: BLE001 - reported, the check goes on
            print(f"  {name:9s} FAILED: {type(e).__name__}: {e}")
            failed += 1
            continue
        ok = max(errs.values()) < PROBE_TOL[dtype]
        failed += not ok
        print(f"  {name:9s} {'ok' if ok else 'FAILED'}   " +
              ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print("all probes passed" if not failed else f"{failed} probe(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
