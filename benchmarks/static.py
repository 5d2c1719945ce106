"""Static performance report: compiled facts and a labelled estimate, no GPU needed
(docs/DESIGN.md, "Performance model").

    python -m benchmarks.static [--shapes cm1536 ...] [--ks 3 7 9] [--sweep] [--json PATH]
                                [--md PATH] [--png PATH] [--measured results.json]

Per backend (cuda, triton), benchmark shape, dtype, layout, k and pass it records:

- facts [C]: registers, local memory (spills) and shared memory of the kernel the launch
  uses (cuobjdump of the built CUDA library; the Triton compile of that specialization),
  the launch geometry (the library's planner; the Triton launchers), resident blocks and
  warps per SM by the sm_80/sm_90 occupancy rules, the global load/store instructions of
  the kernel by access width (SASS), bytes moved against the minimum traffic, FMAs
  including recomputation;
- an estimate [E] of H100 time: a roofline / issue-rate model with the constants below,
  good to about +-50%; eager PyTorch is modelled beside it.

CI gates on the facts (tests/test_static.py), never on the estimate. With ``--measured``
(a JSON written by ``python -m benchmarks`` on a GPU) the report sets measured against
predicted times.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# H100 SXM constants (docs/DESIGN.md, "Performance model")
# issue_stall: the cycles a warp waits, on average, between two of its instructions; with n
# resident warps per scheduler, issue runs at n / (n + issue_stall) of one instruction per
# cycle. Fit to the H100 per-kernel times of the tensor-core kernels (run4: 0.30-0.63 of
# the full rate at 2-9 warps per scheduler; Nsight Compute's issue-active 40% and 52% for
# B2's two kernels at k = 9), within about +-20% of each.
H100 = dict(hbm=3.0e12, l2=5.5e12, sms=132, clock=1.98e9, fp32_fma=67e12 / 2,
            tc_mac=990e12 / 2,
            schedulers=4, smem_bytes_per_clk=128, latency_ns=450, launch_us=3.0,
            issue_stall=6.0)
ARCH_LIMITS = {  # per SM: warps, blocks, registers, shared memory (bytes), per-block reserve
    80: dict(warps=64, blocks=32, regs=65536, smem=167936, reserve=1024),
    90: dict(warps=64, blocks=32, regs=65536, smem=233472, reserve=1024),
}
# Occupancy floors (resident warps per SM at k <= 9, sm_80 and sm_90), the gate of
# tests/test_static.py. F1/F2 stage one tensor per tile with one 16-byte load in flight per
# thread: 24 warps keep >= 12 KB in flight per SM, above the ~10 KB that 3 TB/s x 450 ns
# needs across 132 SMs. B1 stages two tensors per tile (twice the bytes in flight per warp).
# B2 performs ~3.5x the FMAs per byte of F2 (du on the halo, dx, dW), so its time is bound
# by the FMA pipes, which 8 warps with 16 independent accumulators each keep busy.
OCCUPANCY_FLOOR = {"F1": 24, "F2": 24, "B1": 16, "B2": 8}
MODES = {"eval": ("F2",), "train_fwdbwd": ("F1", "F2", "B1", "B2")}
# minimum HBM traffic per pass in units of |x| (docs/DESIGN.md, "Forward" and "Backward")
MIN_TRAFFIC = {"F1": 1, "F2": 2, "B1": 2, "B2": 3}
# eager PyTorch: passes over |x| of the reference block's ops, and the FMA efficiency of
# PyTorch's native depthwise kernels (assumed: forward / input gradient / weight gradient)
EAGER_TRAFFIC = {"eval": 9, "train_fwdbwd": 24}
EAGER_ETA = {"fwd": 0.087, "bwd_input": 0.087, "bwd_weight": 0.016}


def tool(name):
    from benchmarks.targets import tool as t
    return t(name)


# --------------------------------------------------------------------------- occupancy
def occupancy(arch: int, threads: int, regs: int, smem: int) -> dict:
    """Resident blocks and warps per SM (the CUDA occupancy rules: warp, block, register
    (per-warp allocation in units of 256) and shared-memory limits)."""
    lim = ARCH_LIMITS[arch]
    warps = max(1, math.ceil(threads / 32))
    by_warps = lim["warps"] // warps
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs"] // regs_warp) // warps
    by_smem = lim["smem"] // (smem + lim["reserve"]) if smem else lim["blocks"]
    blocks = max(0, min(lim["blocks"], by_warps, by_regs, by_smem))
    limiter = min((("warps", by_warps), ("registers", by_regs), ("shared memory", by_smem),
                   ("blocks", lim["blocks"])), key=lambda kv: kv[1])[0]
    return dict(blocks=blocks, warps=blocks * warps, limiter=limiter)


# --------------------------------------------------------------------------- SASS facts
# kernel, element type, KT and SU: whether it saves (F1) or reads (F2, B1, B2) the saved u
_MANGLED = re.compile(
    r"_ZN3cmx\d+(\w+?_kernel)I(f|6__half|13__nv_bfloat16)(?:Li(\d+)E)?(?:Lb([01])E)?"
    r"(?:Lb([01])E)?")
_DTYPE_OF = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
# one SASS instruction: (address, opcode, operands)
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*)")


def access_widths(opcodes):
    """{"LDG": {16: n, ...}, "STG": ..., "LDS": ..., "STS": ...}: memory instructions by
    access width in bytes."""
    out = {k: {} for k in ("LDG", "STG", "LDS", "STS", "LDGSTS")}
    for op in opcodes:
        base = op.split(".")[0]
        if base not in out:
            continue
        mods = op.split(".")[1:]
        width = 16 if "128" in mods else 8 if "64" in mods else \
            2 if ("U16" in mods or "S16" in mods) else 1 if ("U8" in mods or "S8" in mods) else 4
        out[base][width] = out[base].get(width, 0) + 1
    return out


def sass_facts(opcodes):
    """The SASS facts the report keeps of one kernel: memory instructions by access width,
    the instruction count, the FFMA and tensor-core MMA (``HMMA``) counts and the L2
    prefetches (``CCTL.E.PF2``)."""
    return dict(widths=access_widths(opcodes), instructions=len(opcodes),
                ffma=sum(op.startswith("FFMA") for op in opcodes),
                hmma=sum(op.startswith("HMMA") for op in opcodes),
                prefetches=sum(op.startswith("CCTL") and "PF2" in op.split(".")
                               for op in opcodes))


def parse_sass(text):
    """{(arch, function): [opcodes]} from cuobjdump -sass output."""
    funcs, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            funcs[(arch, name)] = []
            continue
        if name is not None:
            m = _INSTR.search(line)
            if m:
                funcs[(arch, name)].append(m.group(2))
    return funcs


def loop_bodies(text):
    """[instructions of each loop body] of the one function in cuobjdump -sass output, in
    address order: a loop is a backward branch (``BRA`` to an earlier address), its body the
    instructions from the target to the branch. The static count holds one pass through
    each body; ``dynamic_instructions`` adds the others."""
    addrs, loops = [], []
    for line in text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addrs.append(addr)
        if m.group(2).startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", m.group(3))
            if t and int(t.group(1), 16) < addr:
                loops.append(len(addrs) - addrs.index(int(t.group(1), 16)))
    return loops


def dynamic_instructions(fact, trips):
    """[E] instructions one thread issues: the static count plus each loop body once per
    further iteration, the loops (``fact["loops"]``, address order) matched with ``trips``
    (the kernel's loops in source order; a loop the compiler unrolled has no backward
    branch, its copies are in the static count; with fewer loops than ``trips``, the
    shortest were unrolled). None when there are more loops than ``trips``."""
    loops = fact.get("loops", [])
    if not loops:
        return fact.get("instructions", 0)
    if len(loops) > len(trips):
        return None
    longest = sorted(sorted(range(len(trips)), key=lambda i: -trips[i])[:len(loops)])
    trips = [trips[i] for i in longest]
    return fact["instructions"] + sum(b * (t - 1) for b, t in zip(loops, trips))


FACTS_CACHE = os.path.join(ROOT, "build", "facts-cache")


@functools.lru_cache(maxsize=None)
def cuda_kernel_facts(lib_path):
    """{(arch, kernel, dtype, KT, SU): {regs, stack, local, shared, sass widths, instrs}} of
    the built CUDA library (SU: the instantiation that saves or reads the saved u; a kernel
    templated on T alone, apply_u_kernel, bwd_reduce_u_kernel and du_kernel: KT 0, SU False;
    for stats_mma_kernel the bool is its AFF, the input affine's instantiation;
    apply_mma_kernel's key has two, its AFF and its PIPE (several images a block);
    bwd_mma_kernel's two are its DU (du read from du_kernel's buffer) and its AFF).
    Disassembling the library takes about 25 s on a CI core, so the facts are kept in
    FACTS_CACHE under a hash of the library's bytes and of the code that reads them (the
    tests of the build, the static report and the installed wheel's tests read the same)."""
    import hashlib
    import pickle
    h = hashlib.sha256()
    for path in (lib_path, __file__, os.path.join(HERE, "targets.py")):
        with open(path, "rb") as f:
            h.update(f.read())
    cached = os.path.join(FACTS_CACHE, f"cuda-{h.hexdigest()[:24]}.pickle")
    if os.path.isfile(cached):
        with open(cached, "rb") as f:
            return pickle.load(f)
    facts = _read_cuda_kernel_facts(lib_path)
    try:
        os.makedirs(FACTS_CACHE, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(facts, f)
        os.replace(tmp, cached)  # whole or absent, for a concurrent reader
    except OSError:  # (a read-only tree: computed each time)
        pass
    return facts


def _read_cuda_kernel_facts(lib_path):
    from benchmarks.targets import resource_usage
    res = resource_usage(lib_path)
    sass = parse_sass(subprocess.run([tool("cuobjdump"), "-sass", lib_path],
                                     capture_output=True, text=True, check=True).stdout)
    facts = {}
    for r in res:
        m = _MANGLED.search(r["function"])
        if not m:
            continue
        ops = sass.get((r["arch"], r["function"]), [])
        key = (r["arch"], m.group(1), _DTYPE_OF[m.group(2)], int(m.group(3) or 0),
               m.group(4) == "1") + ((m.group(5) == "1",) if m.group(5) else ())
        facts[key] = dict(r, **sass_facts(ops))
    return facts


# --------------------------------------------------------------------------- the model
def conv_cost(outputs, K, RH, RW, unrolled=True):
    """Per-thread-block-independent cost of `outputs` register-blocked correlation outputs:
    FMAs, shared-memory wavefronts (128 B each: a warp's 16-byte loads of 32 lanes take 4,
    a broadcast 1) and instructions, per output."""
    ffma = K * K
    rows = RH + K - 1
    if unrolled:
        nv = math.ceil((RW + K - 1) / 4)
        lds_window = rows * nv / (RH * RW)           # LDS.128 per output
        lds_weight = RH * K * math.ceil(K / 4) / (RH * RW)
        wavefronts = lds_window * 4 + lds_weight     # per warp-output / 32 lanes
        instr = ffma + lds_window + lds_weight
    else:  # run-time k: per row and 4 taps, RW + 3 inputs and 4 weights per output row
        groups = math.ceil(K / 4)
        lds_window = rows * groups * math.ceil((RW + 3) / 4) / (RH * RW)
        lds_weight = RH * K * groups / (RH * RW)
        wavefronts = lds_window * 4 + lds_weight
        instr = ffma + lds_window + lds_weight + rows * groups * RH / (RH * RW)  # guards
    return dict(ffma=ffma * outputs, wavefronts=wavefronts * outputs / 32,
                instr=instr * outputs)


def issue_rate(warps_per_sm):
    """[E] the fraction of one instruction per cycle a scheduler issues with
    ``warps_per_sm / 4`` resident warps to choose from (H100["issue_stall"])."""
    n = warps_per_sm / H100["schedulers"]
    return n / (n + H100["issue_stall"]) if n > 0 else 1.0


def estimate(dram, l2, ffma, instr, wavefronts, warps, bytes_per_load, blocks, arch=90,
             mma=0.0):
    """[E] seconds on an H100 for one kernel: the largest of the DRAM time (slowed when too
    few bytes are in flight to cover the latency), L2, FP32 FMA, tensor-core (``mma``:
    16-bit multiply-adds, dense rate), instruction issue (at the rate ``warps`` resident warps
    per SM sustain: :func:`issue_rate`) and shared-memory times, plus the launch overhead.
    Returns (seconds, bound)."""
    c = H100
    need = c["hbm"] / c["sms"] * c["latency_ns"] * 1e-9          # bytes in flight per SM
    inflight = warps * 32 * bytes_per_load
    eff = min(1.0, inflight / need) if warps else 0.0
    sms_used = min(c["sms"], blocks) / c["sms"] if blocks else 1.0
    terms = {
        "DRAM": dram / (c["hbm"] * max(eff, 1e-3)),
        "L2": l2 / c["l2"],
        "FMA": ffma / (c["fp32_fma"] * sms_used),
        "tensor cores": mma / (c["tc_mac"] * sms_used),
        "issue": instr / (c["sms"] * c["schedulers"] * 32 * c["clock"] * sms_used
                          * issue_rate(warps)),
        "shared memory": wavefronts * 128 / (c["sms"] * c["smem_bytes_per_clk"] * c["clock"]
                                             * sms_used),
    }
    bound = max(terms, key=terms.get)
    return terms[bound] + c["launch_us"] * 1e-6, bound


def _elem(dtype):
    return 4 if dtype == "float32" else 2


# --------------------------------------------------------------------------- CUDA passes
_CUDA_KERNEL = {"F1": "stats_kernel", "F2": "apply_kernel", "B1": "bwd_reduce_kernel",
                "B2": "bwd_main_kernel"}
# the passes' kernels that load global memory directly (plan.direct: reading the saved u)
_CUDA_DIRECT_KERNEL = {"F2": "apply_u_kernel", "B1": "bwd_reduce_u_kernel"}


def _planner():
    """The CUDA library's planner, its F2 on CUDA cores: the model's CUDA rows cost the
    CUDA-core kernels (16-bit NCHW F2 runs on tensor cores by default, apply_mma_kernel: not
    modelled here; its static count holds every activation's epilogue, and its time is
    measured: docs/DESIGN.md, "CUDA tensor cores")."""
    from convmixer_ext import backends
    from convmixer_ext.cuda_kernels import Launchers
    for kind in ("cuda", "emulation"):
        lib, _ = backends.library(kind)
        if lib is not None:
            return Launchers(lib, "meta", tensor_cores=False)
    raise RuntimeError("neither library is built: the planner is needed for the CUDA report")


def _meta(shape, dtype, layout):
    import torch
    x = torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def cuda_kt(k, pass_, su):
    """The KT template argument of a CUDA pass's kernel (csrc/fused_dw.cu, ``unrolled``):
    3, 5, 7 and 9 unrolled, 0 the generic; with the saved u (``su``) F1 and B2 unroll 7 and
    9, and F2 and B1 (reading it) convolve nothing (0)."""
    if not su:
        return k if k in (3, 5, 7, 9) else 0
    return (k if k in (7, 9) else 0) if pass_ in ("F1", "B2") else 0


# [E] instructions per element of a kernel that reads the saved u and convolves nothing: B1's
# staged one, two planes through shared memory (16-byte loads, scalar shared stores and
# loads), the activation (erf: ~15) and the two sums; bwd_reduce_u_kernel (NCHW), its 16-byte
# loads direct, about 6 fewer; apply_u_kernel (F2, element by element), the 16-byte loads and
# store, the activation, the input and BN affines with their per-channel loads
ELEMENTWISE_INSTR = {"bwd_reduce_kernel": 30, "bwd_reduce_u_kernel": 24, "apply_u_kernel": 24}


def cuda_passes(shape, k, dtype, layout, lib_path):
    """Facts and estimate of every CUDA pass for one case, as the op runs them by default:
    training saves the convolution output u from k = 7 up (backends.saves_conv_output), so
    F1 writes it and F2 (in training), B1 and B2 read it; eval's F2 convolves."""
    from convmixer_ext import _cmx_lib
    from convmixer_ext.backends import saves_conv_output
    N, C, H, W = shape
    e = _elem(dtype)
    RW = 16 // e
    RH = 16 // RW
    x = _meta(shape, dtype, layout)
    save = saves_conv_output("cuda", k, True)
    planner = _planner()
    plans = {su: planner.plan(x, k, 0, False, saved_u=su) for su in (False, True)}
    facts = cuda_kernel_facts(lib_path)
    xbytes = N * C * H * W * e
    elems = N * C * H * W
    TH, TW = plans[False].tile_h, plans[False].tile_w
    tiles = N * math.ceil(H / TH) * math.ceil(W / TW)
    GH, GW = math.ceil(TH / RH), math.ceil(TW / RW)
    out_per_tile = GH * RH * GW * RW           # outputs computed (padded groups)
    valid_per_tile = TH * TW
    scale = tiles * C / valid_per_tile
    ext = math.ceil((GH * RH + k - 1) / RH) * RH * math.ceil((GW * RW + k - 1) / RW) * RW
    # (pass, u: None / "save" / "load", the modes it runs in)
    variants = [("F1", "save" if save else None, ["train_fwdbwd"]),
                ("F2", None, ["eval"] if save else ["eval", "train_fwdbwd"])]
    variants += [("F2", "load", ["train_fwdbwd"])] if save else []
    variants += [(p, "load" if save else None, ["train_fwdbwd"]) for p in ("B1", "B2")]
    rows = []
    for name, u, modes in variants:
        i = _cmx_lib.PASSES.index(name)
        su = u is not None
        plan, load = plans[su], u == "load"
        elementwise = load and name != "B2"  # F2, B1 reading u: no convolution
        threads, smem = plan.threads[i], plan.smem[i]
        # the library's direct kernels (plan.direct): F2 reading u on a dense x,
        # apply_u_kernel; B1 reading it in NCHW on the 16-byte path, bwd_reduce_u_kernel
        direct = bool(plan.direct >> i & 1)
        kern = (_CUDA_DIRECT_KERNEL if direct else _CUDA_KERNEL)[name]
        KT = cuda_kt(k, name, su)
        fkey = (kern, dtype, 0, False) if direct else (kern, dtype, KT, su)
        # the 16-byte path: the tiles' (the plan's), or apply_u_kernel's own: rows of C
        # (channels_last) or H*W (NCHW) elements in 16-byte chunks
        vec = (C if layout == "channels_last" else H * W) % RW == 0 \
            if kern == "apply_u_kernel" else plan.vec
        f90, f80 = facts.get((90, *fkey), {}), facts.get((80, *fkey), {})
        occ = {a: occupancy(a, threads, f.get("regs", 0), smem + f.get("shared", 0))
               for a, f in ((80, f80), (90, f90))}
        parts = plan.partial_rows[i]
        # bytes: the minimum of the pass (with u: F1 writes it, the others read it instead of
        # x's halo; B1 then reads no x), plus weights, partial rows (written, then read)
        minimum = (MIN_TRAFFIC[name] - (name == "B1" and load)) * xbytes + su * 4 * elems
        partial = {"F1": 3 * 4, "B1": 2 * 4, "B2": (k * k + 1) * 4}.get(name, 0) * parts * C * 2
        weights = C * k * k * e * (plan.blocks[i] / max(1, math.ceil(C / plan.channels_per_block[i])))
        dram = minimum + partial + C * k * k * e
        # halo re-reads come from L2 (neighbouring tiles of one image are consecutive)
        halo = ((TH + k - 1) * (TW + k - 1) / (TH * TW) - 1) if (TH < H or TW < W) else 0.0
        ehalo = ext / valid_per_tile - 1 if (TH < H or TW < W) else 0.0
        if elementwise:  # the tile itself, no halo, no taps
            l2 = 0.0
            cost = dict(ffma=0.0, instr=0.0, wavefronts=0.0)
        else:
            l2 = xbytes * halo * (2 if name in ("B1", "B2") else 1) + weights
            cost = {key: v * scale for key, v in conv_cost(
                out_per_tile * valid_per_tile, k, RH, RW, unrolled=KT > 0).items()}
        if name == "B2":  # du on the extended region (recomputed, or read: u), dx, dW
            if load:  # u and dout on the extended region, x on the tile's halo
                l2 = xbytes * halo + (4 * elems + xbytes) * ehalo + weights
            else:
                cdu = conv_cost(ext * valid_per_tile, k, RH, RW, unrolled=KT > 0)
                cost = {key: (cost[key] + cdu[key] * scale) for key in cost}
            # dW: per unit (a tap row, dj tap columns) and chunk of RW positions, RW du loads
            # (scalar) and a window of RW + dj - 1 inputs for RW * dj FMAs: scalar loads, or
            # with u read 16-byte loads (and 16 columns per unit at a run-time k)
            dj = k if KT else (16 if load else 8)
            units = k * math.ceil(k / dj)
            window = RW + dj - 1
            dw_ffma = elems * k * k
            per_item = elems / RW * units
            dw_lds = per_item * (RW + (math.ceil(window / 4) if load else window))
            cost["ffma"] += dw_ffma
            cost["instr"] += dw_ffma + dw_lds
            cost["wavefronts"] += per_item * (RW + window) / 32
        instr = ELEMENTWISE_INSTR[kern] * elems if elementwise else \
            cost["instr"] * 1.15  # address arithmetic, predicates, conversions
        t, bound = estimate(dram, l2, cost["ffma"], instr, cost["wavefronts"],
                            occ[90]["warps"], 16 if vec else e, plan.blocks[i])
        rows.append(dict(
            backend="cuda", pass_=name, kernel=kern, u=u, modes=modes,
            regs=f90.get("regs"),
            regs_sm80=f80.get("regs"), local=max(f90.get("local", 0), f80.get("local", 0)),
            stack=max(f90.get("stack", 0), f80.get("stack", 0)),
            smem_dynamic=smem, smem_static=f90.get("shared", 0), threads=threads,
            blocks=plan.blocks[i], channels_per_block=plan.channels_per_block[i],
            tile=[TH, TW], vec=bool(vec), partial_rows=parts,
            occupancy={a: o for a, o in occ.items()},
            widths={k2: {str(w): n for w, n in v.items()} for k2, v in
                    f90.get("widths", {}).items() if v},
            prefetches=f90.get("prefetches", 0),
            bytes_min=minimum, bytes=dram, bytes_ratio=dram / minimum, l2_bytes=l2,
            fma=cost["ffma"], fma_per_element=cost["ffma"] / elems,
            predicted_ms=t * 1e3, bound=bound))
    return rows


# --------------------------------------------------------------------------- Triton passes
_TRITON_PASSES = {"_stats_kernel": "F1", "_apply_kernel": "F2", "_bwd_reduce_kernel": "B1",
                  "_bwd_du_kernel": "B2", "_bwd_dx_kernel": "B2", "_bwd_dw_kernel": "B2"}


def nested_instructions(fact, outer, inner):
    """[E] instructions one thread issues in a kernel of two nested loops (``fact["loops"]``
    in address order: the inner body, then the outer one, which holds the inner once), run
    ``outer`` and ``outer * inner`` times."""
    loops = fact.get("loops", [])
    if len(loops) != 2:
        raise RuntimeError(f"{fact.get('kernel')}: loops {loops}, expected two nested ones")
    body_in, body_out = loops
    return fact["instructions"] + body_out * (outer - 1) + body_in * (outer * inner - 1)


def triton_passes(shape, k, dtype, layout, tc=False):
    """Facts (from the real-target compile of the exact specializations) and estimate of
    every Triton kernel of one case; ``tc``: the tensor-core launchers ("triton_tc": the
    convolution of F1, F2, B1 and du as GEMMs of K * KP multiply-adds per (padded) output;
    issue counted from the compiled code and its loops: :func:`dynamic_instructions`)."""
    import torch
    from benchmarks import targets
    from convmixer_ext import triton_kernels as tk
    N, C, H, W = shape
    e = _elem(dtype)
    recorded = []
    with tk.recording(lambda kern, grid, args, kw: recorded.append((kern, grid, args, kw))):
        targets._record_block(shape, getattr(torch, dtype), layout, k, 0, False,
                              modes=("train",), tc=tc)
    xbytes, elems = N * C * H * W * e, N * C * H * W
    saved = any(kw.get("U") for _, _, _, kw in recorded)
    rows = []
    for kern, grid, args, kw in recorded:
        name = kern.fn.__name__
        fact = _triton_fact(name, args, kw)
        threads = kw.get("num_warps", 4) * 32
        occ = {a: occupancy(a, threads, fact.get("regs", 0), fact.get("shared", 0))
               for a in (80, 90)}
        u_mode = kw.get("U", tk.U_CONV.value)
        load_u = u_mode == tk.U_LOAD.value  # reads F1's u (fp32) instead of x's halo taps
        ffma = 0 if load_u else elems * k * k
        src = 4 * elems if load_u else xbytes
        # B2b takes dW on tensor cores and over a one-channel tile (NCHW), else _bwd_dw_kernel
        dw_in_dx = name == "_bwd_dx_kernel" and bool(kw.get("TC") or kw["BLOCK_C"] == 1)
        if name == "_stats_kernel":  # U_SAVE: writes u in fp32
            dram = xbytes + (4 * elems if u_mode == tk.U_SAVE.value else 0)
        elif name == "_apply_kernel":  # reads x (the residual, and its taps), writes out
            dram = 2 * xbytes + (4 * elems if load_u else 0)
        elif name == "_bwd_reduce_kernel":  # reads dout
            dram = xbytes + src
        elif name == "_bwd_du_kernel":  # reads dout, writes du in fp32
            dram = xbytes + src + 4 * elems
        elif name == "_bwd_dw_kernel":  # du (fp32) and x's taps; dW partials per image
            dram, ffma = 4 * elems + xbytes, elems * kw["TAPS"] * -(-k * k // kw["TAPS"])
        elif dw_in_dx:  # dx: du (fp32, halo from L2), dout, x, writes dx; the tile's dW
            dram, ffma = 4 * elems + 3 * xbytes, 2 * elems * k * k
        else:  # dx: du (fp32, halo from L2), dout, writes dx (x: for the input affine)
            dram = 4 * elems + (3 if kw["IN_AFFINE"] else 2) * xbytes
            ffma = elems * k * k
        programs = grid[0]
        block_c = kw.get("BLOCK_C", 1)
        rows_p = programs // max(1, math.ceil(C / block_c))
        partial = {"_stats_kernel": 3 * 4, "_bwd_reduce_kernel": 2 * 4,
                   "_bwd_dx_kernel": (k * k + 1 if dw_in_dx else 1) * 4,
                   }.get(name, 0) * rows_p * C * 2
        if name == "_bwd_dw_kernel":  # written, then read by the sum over its rows
            partial = args[4].numel() * 4 * 2
        dram += partial
        # every tap is a masked global load through L1/L2 (no shared memory staging): x's,
        # du's (fp32) in the transposed convolution, both in dW
        tap_bytes = {"_bwd_dx_kernel": 4 + e if dw_in_dx else 4,
                     "_bwd_dw_kernel": 4 + e}.get(name, e)
        l2 = elems * k * k * tap_bytes / 8
        instr = ffma * (fact.get("instructions", 0) / max(fact.get("ffma", 1), 1) or 3.0)
        mma, per_thread = 0.0, None
        if name == "_bwd_dw_kernel":  # loops over its rows, then their positions
            per_thread = nested_instructions(fact, args[-1], W)
            instr = programs * threads * per_thread
        elif load_u:  # no convolution: elementwise work over streamed tensors, no loop
            l2 = 0.0
            per_thread = dynamic_instructions(fact, [])
            instr = programs * threads * per_thread
        elif kw.get("TC"):  # the convolution on tensor cores: its FMAs become MMAs
            TH, TW, KP, IMG = kw["TH"], kw["TW"], kw["KP"], kw["IMG"]
            M = TH * IMG  # the GEMMs' rows: the program's images' tiles stacked
            ffma = 0.0
            # issue: every thread runs the compiled code once, its loops (kernel rows: the
            # forward's; B2's dx and dW) once per iteration; the row windows start 16-byte aligned
            # (vector loads where W allows), so do the Toeplitz operands' [C]
            # the Toeplitz operands, built before the launch, come from L2 whole (K x KP x CW
            # per program; the channel's, read from DRAM once)
            wbytes = k * KP * kw["CW"] * e
            dram += C * wbytes
            if name != "_bwd_dx_kernel":
                mma = programs * M * TW * k * KP
                trips = [k]
                # the row windows re-read each image's halo tile K times (L1 hits after the
                # first touch, a few KB per program); one Toeplitz operand for all IMG
                l2 = programs * (IMG * (TH + k - 1) * (TW + k - 1) * e + wbytes)
            else:  # B2: dx per kernel row (M x KP x TW, twice: du's hi and lo terms), dW
                # per kernel row and 16 columns (16 x M x KX, twice: hi and lo terms; twice
                # more with the input affine)
                halo = IMG * (TH + k - 1)
                n_dw = 2 if kw["IN_AFFINE"] else 1
                mma = programs * k * (2 * M * TW * KP + n_dw * TW // 16 * 32 * M * kw["KX"])
                trips = [k, k]
                # the halo of du (fp32) and x: re-read from L1 after the first
                l2 = programs * (halo * (TW + k - 1) * (4 + e) + wbytes)
            per_thread = dynamic_instructions(fact, trips)
            if per_thread is None:
                raise RuntimeError(f"{name}: loops {fact.get('loops')} do not match {trips}")
            instr = programs * threads * per_thread
        t, bound = estimate(dram, l2, ffma, instr, 0, occ[90]["warps"],
                            fact.get("ldg_bytes", e), programs, mma=mma)
        pass_ = _TRITON_PASSES[name]
        # eval runs F2 computing u; training, with u saved, F2 reading it instead
        modes = ["eval"] if name == "_apply_kernel" and not load_u else []
        if not saved or name != "_apply_kernel" or load_u:
            modes.append("train_fwdbwd")
        rows.append(dict(
            backend="triton_tc" if tc else "triton", pass_=pass_, kernel=name,
            u={0: None, 1: "save", 2: "load"}[u_mode], modes=modes,
            with_u=saved and name == "_bwd_dx_kernel",
            regs=fact.get("regs"),
            local=fact.get("local"), smem_static=fact.get("shared"), threads=threads,
            blocks=programs, occupancy=occ,
            widths={k2: {str(w): n for w, n in v.items()} for k2, v in
                    fact.get("widths", {}).items() if v},
            bytes_min=MIN_TRAFFIC[pass_] * xbytes
            if name not in ("_bwd_du_kernel", "_bwd_dw_kernel") else 0,
            bytes=dram, l2_bytes=l2, fma=ffma, fma_per_element=ffma / elems, mma=mma,
            mma_per_element=mma / elems, tensor_cores=fact.get("tensor_cores"),
            wgmma=fact.get("wgmma"),
            instructions_per_thread=per_thread, loops=fact.get("loops"),
            gemms=fact.get("gemms"),
            predicted_ms=t * 1e3, bound=bound, error=fact.get("error")))
    return rows


def _triton_fact(name, args, kw, arch=90):
    from benchmarks import targets
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
    return targets._compile_one((name, args, kw, arch, True))


def tc_tilings(shapes, ks, specs):
    """[C] (and the model's [E]) of the tensor-core kernels in each tiling of
    ``triton_kernels.tensor_core_tiling`` (bf16, NCHW): registers, resident warps, dynamic
    instructions per output element (the issue the kernels are bound by), wgmma or not."""
    from benchmarks.run import GPU_SHAPES
    from convmixer_ext import triton_kernels as tk
    out = []
    for sname in shapes:
        shape = GPU_SHAPES[sname]
        for k in ks:
            for spec in specs:
                with tk.tensor_core_tiling(spec):
                    kernels = triton_passes(shape, k, "bfloat16", "nchw", tc=True)
                for kr in kernels:
                    out.append(dict(
                        shape_name=sname, k=k, tiling=spec, pass_=kr["pass_"],
                        kernel=kr["kernel"], regs=kr["regs"], local=kr["local"],
                        warps=kr["occupancy"][90]["warps"], threads=kr["threads"],
                        instructions_per_element=kr["blocks"] * kr["threads"] *
                        kr["instructions_per_thread"] / math.prod(shape),
                        wgmma=kr["wgmma"], predicted_ms=kr["predicted_ms"]))
    return out


def tilings_markdown(rows):
    lines = ["", "## Tensor-core tilings (bf16, NCHW)", "",
             "Images per program and warps (`triton_kernels.tensor_core_tiling`): [C] "
             "registers, resident warps/SM on sm_90, dynamic instructions per output element, "
             "wgmma; [E] the model's time (it weighs resident warps, not the latency the "
             "measured kernels are bound by: a GPU run decides).", "",
             "| shape | k | pass | kernel | tiling | regs [C] | spills B [C] | warps/SM [C] | "
             "instr/elem [C] | wgmma [C] | predicted ms [E] |", "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["shape_name"], r["k"], r["kernel"])):
        lines.append(f"| {r['shape_name']} | {r['k']} | {r['pass_']} | {r['kernel']} | "
                     f"{r['tiling']} | {r['regs']} | {r['local']} | {r['warps']} | "
                     f"{r['instructions_per_element']:.1f} | {'yes' if r['wgmma'] else 'no'} | "
                     f"{r['predicted_ms']:.3f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- eager
def eager_estimate(shape, k, dtype, mode):
    """[E] eager PyTorch block: its ops' passes over |x| at the HBM rate plus its depthwise
    convolutions at the assumed FMA efficiencies (EAGER_ETA)."""
    N, C, H, W = shape
    elems = N * C * H * W
    t = EAGER_TRAFFIC[mode] * elems * _elem(dtype) / H100["hbm"]
    fma = elems * k * k / H100["fp32_fma"]
    t += fma / EAGER_ETA["fwd"]
    if mode == "train_fwdbwd":
        t += fma / EAGER_ETA["bwd_input"] + fma / EAGER_ETA["bwd_weight"]
    return t


# --------------------------------------------------------------------------- report
def report(shapes, ks, dtypes, layouts, backends, lib_path, tc_shapes=None):
    """The cases' rows; ``tc_shapes``: the shapes that get triton_tc rows (None: all)."""
    from benchmarks.run import GPU_SHAPES
    out = []
    for sname in shapes:
        shape = GPU_SHAPES[sname]
        for dtype in dtypes:
            for layout in layouts:
                for k in ks:
                    case = dict(shape_name=sname, shape=list(shape), dtype=dtype,
                                layout=layout, k=k)
                    kernels = []
                    if "cuda" in backends:
                        kernels += cuda_passes(shape, k, dtype, layout, lib_path)
                    if "triton" in backends:
                        kernels += triton_passes(shape, k, dtype, layout)
                    if "triton_tc" in backends and dtype != "float32" and (
                            tc_shapes is None or sname in tc_shapes):
                        kernels += triton_passes(shape, k, dtype, layout, tc=True)
                    minimum = {m: sum(MIN_TRAFFIC[p] for p in ps) * math.prod(shape) *
                               _elem(dtype) / H100["hbm"] * 1e3 for m, ps in MODES.items()}
                    modes = {}
                    for mode, passes in MODES.items():
                        eager = eager_estimate(shape, k, dtype, mode) * 1e3
                        modes[mode] = dict(eager_ms=eager, roofline_ms=minimum[mode])
                        for be in backends:
                            if not any(r["backend"] == be for r in kernels):
                                continue
                            ms = sum(r["predicted_ms"] for r in kernels
                                     if r["backend"] == be and r["pass_"] in passes
                                     and mode in r.get("modes", (mode,)))
                            # the reductions' small torch sums and merges (a few launches)
                            ms += 0.01 * len(passes)
                            modes[mode][be] = dict(
                                predicted_ms=ms, vs_eager=eager / ms,
                                pct_roofline=100 * minimum[mode] / ms)
                    out.append(dict(case, kernels=kernels, modes=modes))
    return out


def markdown(rows, compared=None, measured_on=None):
    """The report as Markdown; ``compared``: :func:`compare`'s pairs, when a measurement is
    set against it (``measured_on`` names its device)."""
    lines = ["# Static performance report (predicted, H100 SXM)", "",
             "[C] compiled facts; [E] estimates of the model in docs/DESIGN.md, "
             "\"Performance model\" (+-50%). Occupancy: resident warps/SM on sm_90. The cuda "
             "rows cost F2 on CUDA cores; in 16-bit NCHW (k <= 17) the library runs it on "
             "tensor cores by default, not modelled here (docs/DESIGN.md, \"CUDA tensor "
             "cores\").", "",
             "| shape | dtype | layout | k | mode | eager [E] ms | cuda [E] ms | x eager | "
             "% roofline | triton [E] ms | x eager | triton_tc [E] ms | x eager | % roofline |",
             "|" + "---|" * 14]
    for r in rows:
        for mode, m in r["modes"].items():
            cu, tr, tc = m.get("cuda", {}), m.get("triton", {}), m.get("triton_tc", {})
            f = lambda d, key, fmt: fmt.format(d[key]) if key in d else "—"  # noqa: E731
            lines.append(f"| {r['shape_name']} | {r['dtype']} | {r['layout']} | {r['k']} | "
                         f"{mode} | {m['eager_ms']:.2f} | {f(cu, 'predicted_ms', '{:.2f}')} | "
                         f"{f(cu, 'vs_eager', '{:.1f}x')} | {f(cu, 'pct_roofline', '{:.0f}%')} | "
                         f"{f(tr, 'predicted_ms', '{:.2f}')} | {f(tr, 'vs_eager', '{:.1f}x')} | "
                         f"{f(tc, 'predicted_ms', '{:.2f}')} | {f(tc, 'vs_eager', '{:.1f}x')} | "
                         f"{f(tc, 'pct_roofline', '{:.0f}%')} |")
    lines += ["", "## Kernels", "", "| shape | dtype | layout | k | backend | pass | kernel | "
              "regs [C] | spills + stack B [C] | smem B [C] | warps/SM sm_80/sm_90 [C] | "
              "16-byte LDG/STG [C] | L2 prefetch [C] | bytes / min [C] | FMA/elem [C] | "
              "predicted ms [E] | bound [E] |",
              "|" + "---|" * 17]
    for r in rows:
        for kr in r["kernels"]:
            w = kr.get("widths", {})
            v16 = f"{w.get('LDG', {}).get('16', 0)}/{w.get('STG', {}).get('16', 0)}"
            ratio = f"{kr['bytes'] / kr['bytes_min']:.2f}" if kr.get("bytes_min") else "—"
            smem = (kr.get("smem_dynamic") or 0) + (kr.get("smem_static") or 0)
            lines.append(
                f"| {r['shape_name']} | {r['dtype']} | {r['layout']} | {r['k']} | "
                f"{kr['backend']} | {kr['pass_']} | {kr['kernel']} | {kr.get('regs')} | "
                f"{(kr.get('local') or 0) + (kr.get('stack') or 0)} | {smem} | "
                f"{kr['occupancy'][80]['warps']}/"
                f"{kr['occupancy'][90]['warps']} | {v16} | {kr.get('prefetches', '—')} | "
                f"{ratio} | "
                f"{kr['fma_per_element']:.0f} | {kr['predicted_ms']:.3f} | {kr['bound']} |")
    if compared:
        lines += ["", "## Measured against predicted", "",
                  f"Measured on {measured_on or 'a GPU'}; predicted for the H100 SXM model "
                  "above (an H200 has the same SMs and clock and ~1.4x the HBM bandwidth, so "
                  "memory-bound predictions for it would be lower still).", "",
                  "Calibration (geometric mean of measured / predicted, and its range):", "",
                  "| provider | mode | cases | geo-mean | min | max |", "|---|---|---|---|---|---|"]
        for c in calibration(compared):
            lines.append(f"| {c['provider']} | {c['mode']} | {c['cases']} | {c['geomean']:.2f} | "
                         f"{c['min']:.2f} | {c['max']:.2f} |")
        lines += ["", "| shape | dtype | layout | mode | k | provider | measured ms | "
                  "predicted ms | measured / predicted |", "|---|---|---|---|---|---|---|---|---|"]
        for p in compared:
            lines.append(f"| {' | '.join(map(str, p['key']))} | {p['measured_ms']:.3f} | "
                         f"{p['predicted_ms']:.3f} | {p['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def pass_label(kr):
    """A kernel row's pass, "/u" appended where it saves or reads the convolution output
    (B2's second kernel follows its first: B2 reads u in its du kernel only)."""
    return kr["pass_"] + ("/u" if kr.get("u") or kr.get("with_u") else "")


def compare(rows, measured):
    """[{key, measured_ms, predicted_ms, ratio}] for every case both have: whole blocks
    (mode eval / train_fwdbwd) and single passes (mode F1, F2, B1, B2; the sum of the
    pass's kernels)."""
    from convmixer_ext._cmx_lib import PASSES
    out = []
    for r in rows:
        for pass_ in PASSES + tuple(p + "/u" for p in PASSES):
            for be in sorted({kr["backend"] for kr in r["kernels"]}):
                key = (r["shape_name"], r["dtype"], r["layout"], pass_, r["k"], be)
                pred = sum(kr["predicted_ms"] for kr in r["kernels"]
                           if kr["backend"] == be and pass_label(kr) == pass_)
                if key in measured and pred > 0:
                    out.append(dict(key=key, measured_ms=measured[key], predicted_ms=pred,
                                    ratio=measured[key] / pred))
        for mode, m in r["modes"].items():
            for prov in ("cuda", "triton", "eager"):
                key = (r["shape_name"], r["dtype"], r["layout"], mode, r["k"], prov)
                if key in measured and (prov == "eager" or prov in m):
                    pred = m["eager_ms"] if prov == "eager" else m[prov]["predicted_ms"]
                    out.append(dict(key=key, measured_ms=measured[key], predicted_ms=pred,
                                    ratio=measured[key] / pred))
    return out


def calibration(pairs):
    """Per (provider, mode): how far the model is from the measurement (geometric mean of
    measured / predicted and its range) — the factor to read predictions with."""
    groups = {}
    for p in pairs:
        groups.setdefault((p["key"][5], p["key"][3]), []).append(p["ratio"])
    return [dict(provider=prov, mode=mode, cases=len(rs),
                 geomean=math.exp(sum(map(math.log, rs)) / len(rs)), min=min(rs), max=max(rs))
            for (prov, mode), rs in sorted(groups.items())]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}
    for r in rows:
        groups.setdefault((r["shape_name"], r["dtype"], r["layout"]), []).append(r)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, (key, rs) in zip(axes.flat, sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        ax.plot(ks, [r["modes"]["train_fwdbwd"]["eager_ms"] for r in rs], "k-o", label="eager")
        for be in ("cuda", "triton", "triton_tc"):
            if be in rs[0]["modes"]["train_fwdbwd"]:
                ax.plot(ks, [r["modes"]["train_fwdbwd"][be]["predicted_ms"] for r in rs], "-o",
                        label=be)
        ax.plot(ks, [r["modes"]["train_fwdbwd"]["roofline_ms"] for r in rs], "k--",
                label="memory roofline")
        ax.set_yscale("log")
        ax.set_xlabel("kernel size k")
        ax.set_ylabel("predicted ms (training fwd+bwd)")
        ax.set_title(" ".join(key), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("PREDICTED H100 time (static model, +-50%) vs kernel size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _devices(paths):
    names = []
    for path in paths:
        with open(path) as f:
            env = json.load(f).get("environment", {})
        names.append(f"{env.get('device_name', '?')} ({env.get('date', '?')[:10]})")
    return ", ".join(dict.fromkeys(names))


def _measured(paths):
    """{(shape, dtype, layout, mode, k, provider): ms} from GPU benchmark JSONs."""
    from convmixer_ext.cuda_kernels import default_prefetch
    from convmixer_ext.triton_kernels import DEFAULT_TC_TILING
    records, out = [], {}
    for path in paths:
        with open(path) as f:
            records += json.load(f)["records"]
    for r in records:
        if r.get("kind") == "pass" and "ms" in r and r.get("tiling") in (None, DEFAULT_TC_TILING) and \
                r.get("prefetch") in (None, default_prefetch(r["layout"] == "channels_last")):
            # benchmarks/passes.py: one pass alone (triton_tc in the default tiling, the
            # CUDA library with its prefetches as it sets them by default; "/u": with the
            # convolution output saved by F1 and read by the others)
            out[(r["shape_name"], r["dtype"], r["layout"],
                 r["pass_"] + ("/u" if r.get("saved_u") else ""), r["k"],
                 r["backend"])] = r["ms"]
        if r.get("kind") == "block" and "ms" in r:
            prov = {"auto": None}.get(r["provider"], r["provider"])
            if prov:
                out[(r["shape_name"], r["dtype"], r["layout"], r["mode"], r["k"], prov)] = r["ms"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["cm1536", "cm768", "cifar256"])
    p.add_argument("--ks", nargs="+", type=int, default=[3, 7, 9])
    p.add_argument("--sweep", action="store_true", help="k = 3, 5, ..., 31 as well")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton", "triton_tc"])
    p.add_argument("--tc-shapes", nargs="+", default=None,
                   help="triton_tc rows for these shapes only (default: every shape)")
    p.add_argument("--json", default=os.path.join(ROOT, "build", "static.json"))
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--measured", nargs="+", default=None,
                   help="GPU benchmark JSONs (python -m benchmarks) to compare with")
    p.add_argument("--tc-tilings", nargs="+", default=None, metavar="SPEC",
                   help="also the tensor-core kernels in these tilings (1, 2, 4, 2w, 4w: "
                        "triton_kernels.tensor_core_tiling), bf16 NCHW")
    a = p.parse_args(argv)
    if a.tc_shapes is not None and set(a.tc_shapes) - set(a.shapes):
        p.error(f"--tc-shapes {sorted(set(a.tc_shapes) - set(a.shapes))}: not among --shapes "
                f"{a.shapes}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    from convmixer_ext import _cmx_lib
    lib_path = _cmx_lib.library_path("cuda")
    backends = [b for b in a.backends if b != "cuda" or os.path.exists(lib_path)]
    ks = sorted(set(a.ks + (list(range(3, 32, 2)) if a.sweep else [])))
    rows = report(a.shapes, ks, a.dtypes, a.layouts, backends, lib_path, a.tc_shapes)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    pairs = compare(rows, _measured(a.measured)) if a.measured else None
    extra = {}
    if pairs:
        extra = dict(measured=a.measured, compared=pairs, calibration=calibration(pairs))
    tilings = tc_tilings(a.shapes, ks, a.tc_tilings) if a.tc_tilings else None
    if tilings:
        extra["tc_tilings"] = tilings
    with open(a.json, "w") as f:
        json.dump(dict(schema=1, constants=H100, occupancy_floor=OCCUPANCY_FLOOR,
                       eager_eta=EAGER_ETA, cases=rows, **extra), f, indent=1, default=str)
    md = markdown(rows, pairs, _devices(a.measured) if a.measured else None)
    if tilings:
        md += tilings_markdown(tilings)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.png:
        plot(rows, a.png)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
