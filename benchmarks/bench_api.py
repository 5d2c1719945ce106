"""API-level figures with pytest-benchmark: one ConvMixerLayer forward (eval) and one
training step (forward + backward) per kernel size, fused vs the reference layer.

    .venv/bin/python -m pytest benchmarks/bench_api.py --benchmark-group-by=param:k

On a GPU, use ``python -m benchmarks`` for kernel timings (CUDA events, L2 flush); these
figures include Python and dispatch overhead, which is what a user of the API pays.
"""
import pytest
import torch

from convmixer_ext import ConvMixerLayer
from convmixer_ext.reference import conv_mixer_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (64, 768, 32, 32) if DEVICE == "cuda" else (4, 64, 16, 16)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _layer(kind, k):
    torch.manual_seed(0)
    ref = conv_mixer_layer(SHAPE[1], k)
    if kind == "reference":
        return ref.to(DEVICE)
    fused = ConvMixerLayer(SHAPE[1], k)
    fused.load_state_dict(ref.state_dict())
    return fused.to(DEVICE)


@pytest.mark.parametrize("kind", ["reference", "fused"])
@pytest.mark.parametrize("k", [3, 7, 9])
def test_forward_eval(benchmark, kind, k):
    layer = _layer(kind, k).eval()
    x = torch.randn(SHAPE, device=DEVICE)

    def run():
        with torch.no_grad():
            layer(x)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("kind", ["reference", "fused"])
@pytest.mark.parametrize("k", [3, 7, 9])
def test_train_step(benchmark, kind, k):
    layer = _layer(kind, k).train()
    x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
    probe = torch.randn(SHAPE, device=DEVICE)

    def run():
        layer(x).backward(probe)
        _sync()

    benchmark(run)
