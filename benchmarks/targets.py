"""Real-target compiles, no GPU needed (docs/DESIGN.md, "Verification", tier 2).

The interpreter and the host emulator forgive what a GPU does not, so every kernel is also
compiled for its real targets and the facts of the compiled code are recorded:

- Triton: the launchers themselves are run on meta tensors under
  ``triton_kernels.recording``, so the specializations compiled are exactly the ones they
  pick on a GPU (tiles, ``num_stages``, dtype flags, Triton's integer and alignment
  specialization); each is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch)``.
  Facts: registers and local memory (spills) from ``cuobjdump -res-usage`` of the cubin,
  shared memory from the metadata, whether the PTX uses tensor-core instructions.
- CUDA: ``cuobjdump -res-usage`` of every kernel in the built library.

    python -m benchmarks.targets [--set bench cover] [--arch 80 90] [--jobs 2] [--json PATH]

Every specialization is compiled for the last arch given, and those whose code differs by
target (``every_target``: the GEMMs of the pointwise and tensor-core kernels, mma on sm_80,
wgmma on sm_90) for every arch given (``paths`` is the covering set with fewer kernel
sizes, PATHS_KS); exits 1 if any specialization fails to compile. Compiles are cached by
Triton under ``TRITON_CACHE_DIR`` (default ``build/triton-cache``), keyed by the kernel source hash,
the specialization and the target, so only changed kernels are compiled again.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the jit functions).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# shared-memory limit per block (opt-in maximum), bytes
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def tool(name: str) -> str:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm): the one triton ships, else the
    toolkit's."""
    try:
        import triton.knobs as knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older triton or no nvidia backend
        pass
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    raise FileNotFoundError(f"{name} not found (it ships with triton and the CUDA toolkit)")


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = sm_(\d+)")


def resource_usage(path: str):
    """[{arch, function, regs, stack, shared, local}] of every kernel in a cubin or a
    library (``cuobjdump -res-usage``)."""
    out = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True,
                         text=True, check=True).stdout
    rows, arch = [], None
    for block in re.split(r"\n(?=Fatbin elf code:|Resource usage:)", out):
        m = _ARCH.search(block)
        if m:
            arch = int(m.group(1))
        for f in _RES.finditer(block):
            rows.append(dict(arch=arch, function=f.group(1), regs=int(f.group(2)),
                             stack=int(f.group(3)), shared=int(f.group(4)),
                             local=int(f.group(5))))
    return rows


# --------------------------------------------------------------------------- specializations
def _bench_shapes():
    from benchmarks.run import GPU_SHAPES
    return {n: GPU_SHAPES[n] for n in ("cm1536", "cm768", "cifar256")}


def _tensors(shape, dtype, layout, k):
    import torch
    N, C, H, W = shape
    x = torch.empty(shape, device="meta", dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.empty((C, 1, k, k), device="meta", dtype=dtype)
    b = torch.empty((C,), device="meta", dtype=dtype)
    v = torch.empty((C,), device="meta", dtype=torch.float32)
    return x, w, b, v


def _record_block(shape, dtype, layout, k, act, in_affine, modes=("train", "eval"),
                  tc=False, save_u=None):
    """Launch every depthwise pass the op runs for these settings (training: F1, F2, B1, B2
    with batch statistics; eval: F2 and B2 without); ``tc``: the tensor-core launchers.
    ``save_u``: whether training's F1 saves the convolution output for F2, B1 and B2 (None:
    as the op decides by default, backends.saves_conv_output); eval's F2 always computes it."""
    import torch
    from convmixer_ext import triton_kernels
    from convmixer_ext.backends import saves_conv_output
    tk = triton_kernels.tensor_core_launchers if tc else triton_kernels
    x, w, b, v = _tensors(shape, dtype, layout, k)
    aff = (v, v) if in_affine else (None, None)
    tk.k_apply(x, w, b, v, v, v, v, *aff, act)
    if "train" in modes:
        if save_u is None:
            save_u = saves_conv_output("triton_tc" if tc else "triton", k, True)
        u = dict(u=torch.empty_like(x, dtype=torch.float32)) if save_u else {}
        tk.k_stats(x, w, b, *aff, act, **u)
        if u:
            tk.k_apply(x, w, b, v, v, v, v, *aff, act, **u)
        tk.k_bwd_reduce(x, x, w, b, v, v, *aff, act, **u)
        tk.k_bwd_main(x, x, w, b, v, v, v, v, v, True, *aff, act, **u)
    if "eval" in modes:
        tk.k_bwd_main(x, x, w, b, v, v, v, v, v, False, *aff, act)


def _record_pointwise(shape, dtype, layout, act, co=None):
    import torch
    from convmixer_ext import triton_kernels as tk
    from convmixer_ext._layout import out_like
    N, C, H, W = shape
    co = co or C
    y = torch.empty(shape, device="meta", dtype=dtype)
    if layout == "channels_last":
        y = y.to(memory_format=torch.channels_last)
    w2 = torch.empty((co, C), device="meta", dtype=dtype)
    b = torch.empty((co,), device="meta", dtype=dtype)
    v = torch.empty((co,), device="meta", dtype=torch.float32)
    g = out_like(y, co)
    tk.pw_gemm_act_stats(y, w2, b, g, act)
    tk.pw_bwd_du(g, v, v, y, w2, b, v, act)


def bench_set():
    """The exact specializations of the benchmark shapes (ConvMixer-1536/20, 768/32,
    CIFAR-256/8) at k = 3/7/9, bf16 and fp32, NCHW and channels_last, GELU, training and
    eval forward; the folded input affine of the whole-model benchmark (1536, k = 9); the
    pointwise GEMMs of the same shapes."""
    import torch
    for name, shape in _bench_shapes().items():
        for dtype in (torch.bfloat16, torch.float32):
            for layout in ("nchw", "channels_last"):
                for k in (3, 7, 9):
                    _record_block(shape, dtype, layout, k, 0, False, modes=("train",))
                if name == "cm1536":
                    _record_block(shape, dtype, layout, 9, 0, True, modes=("train",))
                    if dtype == torch.bfloat16 and layout == "nchw":  # tensor cores (opt-in)
                        for k in (3, 7, 9):
                            _record_block(shape, dtype, layout, k, 0, False,
                                          modes=("train",), tc=True)
                _record_pointwise(shape, dtype, layout, 0)


# Kernel sizes of the covering set: the extremes, even and odd, every size the CUDA kernels
# unroll, one generic size on each side of the 16x16-tile switch (k > 15). K only sets
# unrolling and the halo, so sizes between these compile alike.
COVER_KS = (1, 2, 3, 4, 5, 7, 9, 11, 15, 16, 31)


def cover_set(ks=COVER_KS):
    """Every kernel meets every value of each of its constexprs at least once: the kernel
    sizes of ``ks`` (COVER_KS), every activation, fp16, with and without the input affine
    and batch statistics, the NCHW tile shapes and channel blocks of 1..32 channels, and the
    pointwise GEMM for every dtype, layout and activation."""
    import torch
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    for k in ks:
        _record_block((2, 64, 32, 32), f32, "nchw", k, 0, False, modes=("train",))
        # channels_last: the CUDA-core dW kernel's tap blocks (TAPS = K * K padded, <= 128)
        _record_block((2, 64, 16, 16), f32, "channels_last", k, 0, False, modes=("train",))
    # the convolution output saved by F1 and read by F2, B1, B2a where the default does not
    # (k < 7), and recomputed where it does; the input affine, channels_last
    _record_block((2, 64, 32, 32), f32, "nchw", 3, 0, True, modes=("train",), save_u=True)
    _record_block((2, 48, 14, 14), bf16, "channels_last", 9, 1, True, modes=("train",),
                  save_u=False)
    for k in (5, 15, 31):
        _record_block((2, 64, 16, 16), bf16, "channels_last", k, 0, True)
    for act in (1, 2):
        _record_block((2, 64, 32, 32), f16, "nchw", 9, act, True)
        _record_block((2, 48, 14, 14), f16, "channels_last", 7, act, False)
    # NCHW tile shapes (W >= 64, W odd, one row, one column) and channel blocks of CL
    for shape in ((1, 3, 9, 100), (2, 5, 7, 7), (1, 2, 1, 13), (1, 2, 13, 1)):
        _record_block(shape, f32, "nchw", 3, 0, False)
    for c in (2, 3, 5, 9, 17, 33):
        _record_block((2, c, 6, 10), f32, "channels_last", 3, 0, False)
    # the tensor-core convolution: both 16-bit dtypes, both layouts, 16- and 32-wide tiles,
    # the input affine, batch statistics or not, the smallest to the largest k
    for k in (1, 2, 9, 16, 31):
        _record_block((2, 8, 32, 32), bf16, "nchw", k, 0, k == 9, tc=True)
    _record_block((2, 8, 12, 20), f16, "channels_last", 5, 1, True, tc=True)
    _record_block((2, 8, 12, 20), f16, "channels_last", 5, 1, True, tc=True, save_u=True)
    _record_block((2, 8, 32, 32), bf16, "nchw", 9, 0, True, tc=True, save_u=False)
    # float16 B2 with the fp32 du scratch (two tiles per image: B2b scales each halo; one
    # tile, as above, has B2a store du's scaled terms: triton_kernels._split_du)
    _record_block((2, 8, 40, 20), f16, "nchw", 9, 0, False, modes=("train",), tc=True)
    # ... (those in the default tiling, DEFAULT_TC_TILING) and its other tilings
    # (triton_kernels.tensor_core_tiling): one image per program, 2 images of 32 rows, 4 of
    # 16, under the warps of one image or a warp per 16 rows
    from convmixer_ext import triton_kernels as tk
    for spec, shape, k, dtype in (("1", (2, 8, 32, 32), 9, bf16), ("1", (2, 8, 32, 32), 31, bf16),
                                  ("2", (2, 8, 32, 32), 9, bf16), ("2", (2, 8, 32, 32), 31, bf16),
                                  ("2w", (2, 8, 32, 32), 9, bf16), ("4", (4, 8, 16, 16), 9, f16),
                                  ("4w", (4, 8, 16, 16), 9, bf16)):
        with tk.tensor_core_tiling(spec):
            _record_block(shape, dtype, "nchw", k, 0, k == 9, modes=("train",), tc=True)
    # the pointwise GEMMs: every dtype in both layouts; the other activations in one dtype
    # (the epilogue applies them to the fp32 accumulator whatever the operands' dtype; every
    # activation in every dtype was 8 more compiles a target at ~2.5 s each)
    for dtype in (f32, bf16, f16):
        for layout in ("nchw", "channels_last"):
            _record_pointwise((2, 40, 7, 9), dtype, layout, 0, co=24)
    for act in (1, 2):
        _record_pointwise((2, 40, 7, 9), bf16, "nchw", act, co=24)
    # fp32 GEMMs in IEEE fp32 as well as TF32 (they follow cudnn.allow_tf32)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not prev
    try:
        _record_pointwise((2, 40, 7, 9), f32, "nchw", 0, co=24)
    finally:
        torch.backends.cudnn.allow_tf32 = prev


# The covering set's code paths with fewer kernel sizes (K sets unrolling and the halo, not
# which code runs): 1, even and odd, both sides of the 16x16-tile switch. What the oldest
# supported triton compiles in CI (`make test-compat`), where the whole covering set, compiled
# by both versions, did not fit CI's time.
PATHS_KS = (1, 2, 3, 16, 31)

SETS = {"bench": bench_set, "cover": cover_set, "paths": lambda: cover_set(PATHS_KS)}
DEFAULT_SETS = ("bench", "cover")  # ("paths" is within "cover")


def specializations(sets=DEFAULT_SETS):
    """Unique Triton specializations the launchers pick on a GPU for the given sets:
    [(kernel name, args, kwargs)], recorded on meta tensors (nothing runs)."""
    from convmixer_ext import triton_kernels as tk
    seen, out = set(), []

    def record(kernel, grid, args, kwargs):
        key = _spec_key((kernel.fn.__name__, args, kwargs))
        if key not in seen:
            seen.add(key)
            out.append((kernel.fn.__name__, args, dict(kwargs)))

    with tk.recording(record):
        for s in sets:
            SETS[s]()
    return out


def _spec_key(spec):
    name, args, kwargs = spec
    return name, _arg_key(args), tuple(sorted(kwargs.items()))


def _arg_key(args):
    """What the JIT specializes on: tensor dtypes (pointers are 16-byte aligned here) and
    integers (== 1, divisible by 16, 32/64-bit)."""
    key = []
    for a in args:
        if hasattr(a, "dtype") and hasattr(a, "data_ptr"):
            key.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append(type(a).__name__)
        else:
            key.append((a == 1, a % 16 == 0, abs(a) >= 2**31))
    return tuple(key)


# --------------------------------------------------------------------------- compiling
def _compile_one(job):
    """Worker: compile one specialization for one arch; return its facts (or the error).
    job = (kernel name, args, kwargs, arch[, with_sass]): with_sass adds the SASS memory
    instructions by access width and the instruction counts (benchmarks/static.py)."""
    name, args, kwargs, arch = job[:4]
    with_sass = len(job) > 4 and job[4]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from convmixer_ext import triton_kernels as tk
    kernel = getattr(tk, name)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    fact = dict(kernel=name, arch=arch, constexprs={k: v for k, v in consts.items()},
                num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages"),
                dtypes=sorted({str(a.dtype)[6:] for a in args if hasattr(a, "dtype")}))
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                                  opts)
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        chain = []  # the frontend wraps the cause (e.g. a NameError) in a CompilationError
        while e is not None and len(chain) < 4:
            chain.append(f"{type(e).__name__}: {str(e)[:1200]}")
            e = e.__cause__ or e.__context__
        fact["error"] = " <- ".join(chain)
        return fact
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = resource_usage(f.name)
        if with_sass:
            from benchmarks.static import loop_bodies, parse_sass, sass_facts
            text = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True,
                                  text=True).stdout
            sass = parse_sass(text)
            fact.update(sass_facts([op for v in sass.values() for op in v]),
                        loops=loop_bodies(text))
            # the global load width that moves the most bytes (static count x width),
            # cp.async (LDGSTS) included: the loads carrying the DRAM traffic, not the most
            # numerous ones (e.g. the scalar loads of per-channel parameters)
            ldg = dict(fact["widths"]["LDG"])
            for w, n in fact["widths"].get("LDGSTS", {}).items():
                ldg[w] = ldg.get(w, 0) + n
            fact["ldg_bytes"] = max(ldg, key=lambda w: w * ldg[w]) if ldg else 4
    ptx = ck.asm.get("ptx", "")
    fact.update(regs=max(r["regs"] for r in res), local=max(r["local"] for r in res),
                shared=int(ck.metadata.shared),
                tensor_cores="wgmma" in ptx or "mma.sync" in ptx, wgmma="wgmma" in ptx,
                gemms=mma_gemms(ck.asm.get("ttgir", "")))
    return fact


_MMA_LAYOUT = re.compile(r"^(#mma\w*) = #ttg\.nvidia_mma<\{.*?warpsPerCTA = \[(\d+), (\d+)\], "
                         r"instrShape = \[(\d+), (\d+)", re.M)
_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)xf32, (#mma\w*)>")


def mma_gemms(ttgir: str):
    """[{"M", "N", "warps", "copies"}] of every tensor-core GEMM (tt.dot, or on sm_90
    ttng.warp_group_dot: wgmma) in a kernel's TTGIR: its accumulator shape, the warps its
    layout places along M and N, and how many warps compute the same accumulator elements
    (copies > 1: a layout that covers more rows or columns than the GEMM has, e.g. 4 warps of
    16 rows on a 32-row GEMM)."""
    layouts = {m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4, 5))
               for m in _MMA_LAYOUT.finditer(ttgir)}
    out = []
    for m in _DOT.finditer(ttgir):
        M, N = int(m.group(1)), int(m.group(2))
        wm, wn, im, in_ = layouts[m.group(3)]
        copies = max(1, wm * im // M) * max(1, wn * in_ // N)
        out.append(dict(M=M, N=N, warps=[wm, wn], copies=copies))
    return out


# Every specialization is compiled for the newest target; for the older ones only those whose
# code differs by target, the GEMMs (tl.dot: mma on sm_80, wgmma on sm_90): the pointwise
# kernels and the depthwise kernels on tensor cores (TC > 0). The other kernels are the same
# FMA and load arithmetic on every target; their sm_80 compiles took a fifth of the test
# suite's time.
GEMM_KERNELS = ("_pw_gemm_kernel", "_pw_bwd_du_kernel")  # (and TC > 0 below)


def every_target(spec) -> bool:
    """Whether a specialization is compiled for every target (its code differs by target:
    tl.dot), not only the newest."""
    name, _, kwargs = spec
    return name in GEMM_KERNELS or kwargs.get("TC", 0) > 0


def compile_all(sets=DEFAULT_SETS, archs=(80, 90), jobs=None, progress=None):
    """Compile every specialization for every arch; returns the list of facts."""
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
    bench = specializations(tuple(s for s in sets if s == "bench"))
    cover = specializations(tuple(s for s in sets if s != "bench"))
    keys = {_spec_key(sp) for sp in bench}
    cover = [sp for sp in cover if _spec_key(sp) not in keys]
    work = [(name, args, kwargs, arch) for name, args, kwargs in bench + cover
            for arch in (archs if every_target((name, args, kwargs)) else archs[-1:])]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    facts = []
    if jobs <= 1:
        for w in work:
            facts.append(_compile_one(w))
            if progress:
                progress(len(facts), len(work))
        return facts
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        for f in pool.map(_compile_one, work, chunksize=4):
            facts.append(f)
            if progress:
                progress(len(facts), len(work))
    return facts


def cuda_facts(lib_path=None):
    """Resource usage of every kernel in the built CUDA library ([] when it is not built)."""
    from convmixer_ext import _cmx_lib
    path = lib_path or _cmx_lib.library_path("cuda")
    if not os.path.exists(path):
        return []
    return resource_usage(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", nargs="+", choices=list(SETS), default=list(DEFAULT_SETS),
                   help="paths: the covering set with the kernel sizes PATHS_KS only")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default=None, help="write the facts here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")

    def progress(i, n):
        if i % 50 == 0 or i == n:
            print(f"  compiled {i}/{n}", flush=True)

    facts = compile_all(tuple(a.set), tuple(a.arch), a.jobs, progress)
    errors = [f for f in facts if "error" in f]
    over = [f for f in facts if "error" not in f
            and f["shared"] > SMEM_LIMIT.get(f["arch"], 99 * 1024)]
    import triton
    report = dict(triton=triton.__version__, sets=a.set, archs=a.arch, triton_kernels=facts,
                  cuda_kernels=cuda_facts())
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    by_kernel = {}
    for f in facts:
        by_kernel.setdefault((f["kernel"], f["arch"]), []).append(f)
    print(f"triton {triton.__version__}: {len(facts)} compiles (the sets {', '.join(a.set)} "
          f"for sm_{a.arch[-1]}, their GEMMs for "
          f"{', '.join(f'sm_{x}' for x in a.arch)})")
    for (kern, arch), fs in sorted(by_kernel.items()):
        ok = [f for f in fs if "error" not in f]
        if ok:
            print(f"  sm_{arch} {kern:20s} {len(fs):4d} specs, regs {min(f['regs'] for f in ok)}"
                  f"-{max(f['regs'] for f in ok)}, max local {max(f['local'] for f in ok)} B, "
                  f"max shared {max(f['shared'] for f in ok)} B, failed {len(fs) - len(ok)}")
    for f in errors[:10]:
        print(f"FAILED sm_{f['arch']} {f['kernel']} {f['constexprs']}: {f['error'][:600]}")
    for f in over[:10]:
        print(f"OVER SHARED LIMIT sm_{f['arch']} {f['kernel']} {f['constexprs']}: {f['shared']}")
    return 1 if errors or over else 0


if __name__ == "__main__":
    sys.exit(main())
