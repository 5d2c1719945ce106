"""Train a small ConvMixer on scikit-learn's bundled digits (8x8 images, 10 classes) twice
from the same initialisation and the same batches: once with the fused layers, once with
the reference model. Saves both loss curves in one PNG and asserts they agree.

    python examples/train_digits.py [--epochs 4] [--backend auto] [--pointwise auto]
                                    [--out digits_loss.png]

The fused model folds each layer's BN2 into the next layer's depthwise load unless
``--pointwise unfused``.

On a GPU it also reports training images/s for both models.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from convmixer_ext import convert
from convmixer_ext.reference import ConvMixer


def load_digits(device):
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    return x.to(device), y.to(device)


def train(model, x, y, epochs, batch, seed, device):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g).to(device)
        for i in range(0, x.shape[0] - batch + 1, batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            seen += batch
    if device == "cuda":
        torch.cuda.synchronize()
    return losses, seen / (time.perf_counter() - t0)


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--pointwise", default="auto",
                   help="'unfused', or the fused pointwise block with BN2 folded into the "
                        "next layer's load: 'auto', 'triton', 'torch' (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="digits_loss.png")
    p.add_argument("--rtol", type=float, default=0.02,
                   help="allowed relative difference of the smoothed loss curves")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    x, y = load_digits(a.device)
    ref = ConvMixer(dim=32, depth=3, kernel_size=5, patch_size=1, num_classes=10,
                    in_chans=1).to(a.device)
    fused = convert(copy.deepcopy(ref), backend=a.backend, pointwise=a.pointwise)
    loss_r, ips_r = train(ref, x, y, a.epochs, a.batch, 1, a.device)
    loss_f, ips_f = train(fused, x, y, a.epochs, a.batch, 1, a.device)
    acc_r, acc_f = accuracy(ref, x, y), accuracy(fused, x, y)
    print(f"reference: final loss {loss_r[-1]:.4f}, train accuracy {acc_r:.3f}"
          + (f", {ips_r:.0f} images/s" if a.device == "cuda" else ""))
    print(f"fused    : final loss {loss_f[-1]:.4f}, train accuracy {acc_f:.3f}"
          + (f", {ips_f:.0f} images/s" if a.device == "cuda" else ""))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(loss_r, label="reference (PyTorch)", lw=2)
        ax.plot(loss_f, label=f"fused ({a.backend}, pointwise {a.pointwise})", lw=1, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_title("ConvMixer-32/3 (k=5) on sklearn digits")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")
    except ImportError:
        print("matplotlib missing: no plot")

    # the two runs are the same computation up to floating-point reassociation: the curves
    # must agree step by step (window-smoothed) and both must have learned
    w = max(1, len(loss_r) // 10)
    smooth = lambda v: [sum(v[i:i + w]) / w for i in range(0, len(v) - w + 1, w)]  # noqa: E731
    for i, (r, f) in enumerate(zip(smooth(loss_r), smooth(loss_f))):
        assert abs(r - f) <= a.rtol * max(r, 0.05), f"loss curves diverge at window {i}: {r} vs {f}"
    assert loss_r[-1] < 0.5 * loss_r[0] and loss_f[-1] < 0.5 * loss_f[0], "did not learn"
    print("loss curves agree")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
