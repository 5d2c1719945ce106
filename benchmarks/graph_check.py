"""CUDA-graph capture of a whole training step of a converted ConvMixer (needs a GPU; run by
benchmarks/gpu_run.sh, stage ``graph``).

For the fused model (depthwise fused, pointwise unfused) and the folded one (pointwise fused,
BN2 folded into the next layer), and the fused model in bfloat16 on the tensor-core kernels
(whose launches build their Toeplitz operands with device ops): a training step (forward,
cross-entropy, backward, SGD step, BatchNorm buffer updates) is captured in ``torch.cuda.graph``
after warm-up on a side stream, then replayed on new inputs next to an eager copy of the same
model taking the same steps: losses, parameters and buffers must agree. Then the same model under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs through Inductor) must run and agree
with eager. Prints one line per check; exits 1 if any fails.

    python -m benchmarks.graph_check
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F


def _models(pointwise, backend="auto", dtype=torch.float32):
    from convmixer_ext import convert
    from convmixer_ext.reference import ConvMixer
    torch.manual_seed(0)
    ref = ConvMixer(64, 3, kernel_size=9, patch_size=2, num_classes=10)
    return convert(ref, backend=backend, pointwise=pointwise).to("cuda", dtype)


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _close(a, b, what, tol=1e-4):
    """max |u - v| <= tol * max(max |v|, 1e-2) per tensor: fp32's tolerance relative to the
    tensor's scale (as the tests' assert_close), not per element, where Inductor's own
    summation order (reduce-overhead compiles the PyTorch parts too) moves values near 0
    by more than any per-element relative bound."""
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = u.detach().double(), v.detach().double()
        err = (u - v).abs().max().item() if v.numel() else 0.0
        scale = max(v.abs().max().item() if v.numel() else 0.0, 1e-2)
        if not err <= tol * scale:
            return f"{what}[{i}] differs by {err:.3g} (scale {scale:.3g})"
    return None


def check_graph(pointwise: str, backend="auto", dtype=torch.float32) -> str | None:
    model = _models(pointwise, backend, dtype)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, device="cuda", generator=g).to(dtype),
                torch.randint(0, 10, (8,), device="cuda", generator=g)) for _ in range(6)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: lazy init, allocator, optimizer state
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            _step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        _step(eager, opt_e, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(model, opt, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss_e = _step(eager, opt_e, x, y)
        torch.cuda.synchronize()
        tol = 1e-4 if dtype == torch.float32 else 1e-2  # (16-bit: the pointwise convs')
        bad = _close([static_loss], [loss_e], "loss", tol) or \
            _close(_state(model), _state(eager), "parameters/buffers", tol)
        if bad:
            return bad
    return None


def check_reduce_overhead(pointwise: str) -> str | None:
    torch._dynamo.reset()
    model = _models(pointwise)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(2)
    for _ in range(4):
        x = torch.randn(8, 3, 32, 32, device="cuda", generator=g)
        out_c, out_e = compiled(x), eager(x)
        out_c.float().square().mean().backward()
        out_e.float().square().mean().backward()
        bad = _close([out_c], [out_e], "logits") or \
            _close([p.grad for p in model.parameters()], [p.grad for p in eager.parameters()],
                   "gradients")
        if bad:
            return bad
        model.zero_grad()
        eager.zero_grad()
    return None


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 1
    # both sides in plain fp32: TF32 convolutions would differ by more than fp32's tolerance
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    cases = [(name, fn, (pointwise,)) for pointwise in ("unfused", "auto")
             for name, fn in (("cuda graph of a training step", check_graph),
                              ("torch.compile(mode='reduce-overhead')", check_reduce_overhead))]
    cases.append(("cuda graph of a training step, triton_tc bfloat16", check_graph,
                  ("unfused", "triton_tc", torch.bfloat16)))
    for name, fn, args in cases:
        try:
            bad = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported, the other checks go on
            bad = f"{type(e).__name__}: {e}"
        failed += bad is not None
        print(f"{name}, pointwise={args[0]}: {'ok' if bad is None else 'FAILED: ' + bad}",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
