"""``python -m convmixer_ext``: versions, libraries and architectures, every backend with
its availability or reason, what "auto" picks, and a passing correctness probe of every
backend that runs here."""
import os
import subprocess
import sys

import torch

import convmixer_ext
from convmixer_ext.__main__ import probe


def test_self_check_reports_and_probes():
    r = subprocess.run([sys.executable, "-m", "convmixer_ext"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"torch {torch.__version__}" in out and "triton" in out and "CUDA" in out
    for name in convmixer_ext.BACKENDS:
        assert f"  {name} " in out
    assert "auto on" in out and "all probes passed" in out
    assert out.count(" ok ") >= 2  # at least eager and torch ran their probe
    if not torch.cuda.is_available():
        assert "no CUDA device" in out
    want = {"0": "off (CONVMIXER_EXT_CUDA_PREFETCH=0)", "1": "on (CONVMIXER_EXT_CUDA_PREFETCH=1)",
            "": "NCHW only (the default"}[os.environ.get("CONVMIXER_EXT_CUDA_PREFETCH", "").strip()]
    assert f"kernel library L2 prefetch: {want}" in out
    tc = "off (CONVMIXER_EXT_CUDA_TC=0)" if os.environ.get("CONVMIXER_EXT_CUDA_TC", "").strip() \
        == "0" else "on (the default: F2 / eval of 16-bit NCHW, k <= 17"
    assert f"kernel library tensor cores: {tc}" in out


def test_probe_detects_a_wrong_result(monkeypatch):
    """The probe compares with the reference: a backend giving wrong gradients fails it."""
    from convmixer_ext import eager
    real = eager.dw_block
    monkeypatch.setattr(eager, "dw_block", lambda *a, **k: real(*a, **k) * 1.01)
    errs = probe("eager", "cpu")
    assert max(errs.values()) > 1e-3
