"""The public surface: gradcheck, opcheck, torch.compile, state_dict compatibility with the
reference and with timm, convert(), ConvMixer."""
import copy

import pytest
import timm.models.convmixer as timm_convmixer
import torch

import convmixer_ext
from conftest import DEVICE, all_backends, kernel_backends, model_kernel_size
from convmixer_ext import ConvMixer, ConvMixerLayer, convert, fused_dwconv_block
from convmixer_ext.reference import ConvMixer as RefConvMixer, conv_mixer_layer
from helpers import assert_close, layer_pair, randomize_bn


def _block_args(C=3, k=3, N=2, H=5, W=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (r(N, C, H, W), r(C, 1, k, k) / k, 0.1 * r(C), 1 + 0.2 * r(C), 0.1 * r(C))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(activation, k, training):
    x, w, b, gamma, beta = [t.requires_grad_() for t in _block_args(k=k)]
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b, gamma, beta):
        return fused_dwconv_block(x, w, b, gamma, beta, rm.clone(), rv.clone(), None,
                                  training=training, activation=activation, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_folded_affine(training):
    """The block input in_scale*x + in_shift: gradients of x, in_scale and in_shift as well
    as the parameters."""
    x, w, b, gamma, beta = [t.requires_grad_() for t in _block_args(k=3)]
    in_scale = (1 + 0.3 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    in_shift = (0.2 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b, gamma, beta, in_scale, in_shift):
        return fused_dwconv_block(x, w, b, gamma, beta, rm.clone(), rv.clone(), None,
                                  training=training, backend="torch",
                                  in_affine=(in_scale, in_shift))

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta, in_scale, in_shift))


def _saving_backends():
    """(backend, dtype) pairs whose passes can save the convolution output here."""
    from convmixer_ext.backends import SAVES_U_BACKENDS, backend_reason
    pairs = [("torch", torch.float32), ("triton", torch.float32), ("triton_tc", torch.bfloat16),
             ("cuda_emu", torch.float32), ("cuda_emu", torch.bfloat16),
             ("cuda", torch.float32), ("cuda", torch.bfloat16)]
    return [(b, dt) for b, dt in pairs
            if b in SAVES_U_BACKENDS and backend_reason(b, DEVICE) is None]


@pytest.mark.parametrize("backend, dtype", _saving_backends())
@pytest.mark.parametrize("with_affine", [False, True], ids=["plain", "in_affine"])
def test_saved_conv_output_changes_no_result(backend, dtype, with_affine):
    """F1 saving u and F2, B1, B2a reading it gives bitwise the results of recomputing u
    (the passes read exactly what F1 computed): the output, every gradient and the running
    statistics, at k = 7, where "auto" saves it on the kernel backends."""
    g = torch.Generator().manual_seed(4)
    C, k = 3, 7
    x0, w0, b0, gamma0, beta0 = (t.to(DEVICE) for t in _block_args(C, k, 2, 9, 11, dtype))
    gamma0, beta0 = gamma0.float(), beta0.float()
    aff0 = (1 + 0.3 * torch.rand(C, generator=g), 0.2 * torch.randn(C, generator=g)) \
        if with_affine else ()
    dout = torch.randn(x0.shape, generator=g).to(device=DEVICE, dtype=dtype)
    results = []
    for save in (False, True, None):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0, gamma0, beta0)]
        aff = [t.to(DEVICE).requires_grad_() for t in aff0]
        rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
        saved = []  # what autograd keeps for backward: x, and u in float32 where saved
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            out = fused_dwconv_block(*leaves, rm, rv, training=True, backend=backend,
                                     in_affine=tuple(aff) or None, save_conv=save)
        kept_u = saved.count((torch.float32, tuple(x0.shape))) - (dtype == torch.float32)
        assert kept_u == (save or (save is None and backend != "torch")), (save, saved)
        out.backward(dout)
        results.append([out, rm, rv] + [t.grad for t in leaves + aff])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)
    # the op returns what it saved: u in float32 with x's shape, and nothing without F1
    x = x0.contiguous(memory_format=torch.channels_last)
    args = (x, w0, b0, gamma0, beta0, torch.zeros(C, device=DEVICE),
            torch.ones(C, device=DEVICE), None, None)
    u = torch.ops.convmixer_ext.dw_block_fwd(*args, True, 1e-5, "gelu", backend, True)[3]
    assert u.dtype == torch.float32 and u.shape == x.shape and u.stride() == x.stride()
    assert torch.ops.convmixer_ext.dw_block_fwd(*args, False, 1e-5, "gelu", backend,
                                                True)[3].numel() == 0


def test_model_save_conv_reaches_every_layer():
    """ConvMixer(save_conv=...) / convert(): every fused layer saves the convolution output
    (one float32 tensor of the block's input shape kept per layer) or none does; the
    results are bitwise the same."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for save in (False, True):
        torch.manual_seed(0)
        model = ConvMixer(8, 2, kernel_size=7, patch_size=2, num_classes=3, backend="torch",
                          save_conv=save)
        assert all(layer.save_conv is save for layer in model.blocks)
        assert ("save_conv=True" in repr(model)) is save
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            out = model(x)
        out.square().sum().backward()
        runs[save] = (saved.count((torch.float32, (2, 8, 4, 4))),
                      [out] + [p.grad for p in model.parameters()])
    assert runs[True][0] - runs[False][0] == 2  # u of each of the 2 layers
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))


def test_save_conv_policy():
    from convmixer_ext.backends import SAVE_U_MIN_KERNEL_SIZE as K0, saves_conv_output as s
    assert s("triton_tc", K0, True) and s("triton", 31, True)
    assert not s("triton_tc", K0 - 1, True) and not s("torch", 9, True)
    assert not s("triton", 9, False)           # no F1 without batch statistics: nothing saved
    assert not s("triton", 9, True, False) and s("torch", 3, True, True)
    assert s("cuda", 9, True) and s("cuda_emu", 7, True) and not s("cuda", 3, True)
    assert not s("eager", 9, True, True)
    with pytest.raises(TypeError, match="save_conv must be None or a bool"):
        s("triton", 9, True, 1)


@pytest.mark.parametrize("backend, save_conv",
                         [(b, None) for b in ["torch", "auto"] + kernel_backends()]
                         + [(b, True) for b in dict.fromkeys(b for b, _ in _saving_backends())
                            if b != "triton_tc"])
def test_torch_compile_fullgraph_matches_eager(backend, save_conv):
    """fullgraph=True: no graph break anywhere, the backend choice included (it reads the
    library's files and the environment, which Dynamo cannot trace: it is a constant of the
    compiled graph, guarded by x's device, dtype and layout); save_conv=True: the saved
    convolution output passes from the forward op to the backward one."""
    torch._dynamo.reset()
    ref, fused = layer_pair(4, model_kernel_size(backend), "gelu", backend, torch.float32,
                            DEVICE)
    fused.save_conv = save_conv
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g).to(DEVICE)
    for train in (True, False, True):
        eager.train(train)
        fused.train(train)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        oe, oc = eager(xe), compiled(xc)
        assert_close(oc, oe, torch.float32, "compiled out")
        probe = torch.randn(oe.shape, generator=g).to(DEVICE)  # sum() would give ~0 in train
        oe.backward(probe)
        oc.backward(probe)
        assert_close(xc.grad, xe.grad, torch.float32, "compiled x.grad")
    for (n, be), (_, bc) in zip(eager.named_buffers(), fused.named_buffers()):
        assert torch.allclose(be.float(), bc.float(), rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("backend", ["torch", "auto"] + kernel_backends())
def test_torch_compile_dynamic_fullgraph_matches_eager(backend):
    """dynamic=True: the batch, height and width are symbolic and the module's floats (eps,
    momentum) too; validation compares them instead of calling math.isfinite, and the
    backend choice takes the width's divisibility as a guarded constant (a width of the
    other kind recompiles, it does not reuse the choice)."""
    torch._dynamo.reset()
    ref, fused = layer_pair(4, model_kernel_size(backend), "gelu", backend, torch.float32,
                            DEVICE)
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(1)
    for shape, train in (((2, 4, 6, 6), True), ((3, 4, 7, 8), False), ((1, 4, 9, 16), True)):
        eager.train(train)
        fused.train(train)
        x = torch.randn(shape, generator=g).to(DEVICE)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        oe, oc = eager(xe), compiled(xc)
        assert_close(oc, oe, torch.float32, f"compiled out {shape}")
        probe = torch.randn(oe.shape, generator=g).to(DEVICE)
        oe.backward(probe)
        oc.backward(probe)
        assert_close(xc.grad, xe.grad, torch.float32, f"compiled x.grad {shape}")
    for (n, pe), (_, pc) in zip(eager.named_parameters(), fused.named_parameters()):
        assert_close(pc.grad, pe.grad, torch.float32, f"compiled {n}.grad")
    for (n, be), (_, bc) in zip(eager.named_buffers(), fused.named_buffers()):
        assert torch.allclose(be.float(), bc.float(), rtol=1e-5, atol=1e-6), n


def test_layer_state_dict_keys_and_round_trip():
    ref = conv_mixer_layer(6, 7, "relu")
    fused = ConvMixerLayer(6, 7, "relu")
    assert list(ref.state_dict()) == list(fused.state_dict())
    for k in ("0.fn.0.weight", "0.fn.2.running_var", "1.weight", "3.bias"):
        assert k in fused.state_dict()
    randomize_bn(ref, 4)
    fused.load_state_dict(ref.state_dict())
    ref2 = conv_mixer_layer(6, 7, "relu")
    ref2.load_state_dict(fused.state_dict())
    for (n, a), (_, b) in zip(ref.state_dict().items(), ref2.state_dict().items()):
        assert torch.equal(a, b), n


def _timm(dim=16, depth=2, k=5, patch=2, act=torch.nn.GELU, num_classes=10):
    torch.manual_seed(0)
    m = timm_convmixer.ConvMixer(dim=dim, depth=depth, kernel_size=k, patch_size=patch,
                                 num_classes=num_classes, act_layer=act)
    randomize_bn(m, 1)
    return m


def _compare_whole(ref, fused, x, train):
    ref.zero_grad(set_to_none=True)
    fused.zero_grad(set_to_none=True)
    ref.train(train)
    fused.train(train)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fused(xf)
    assert_close(out_f, out_r, torch.float64, "logits")
    out_r.square().sum().backward()
    out_f.square().sum().backward()
    assert_close(xf.grad, xr.grad, torch.float64, "x.grad")
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert_close(pf.grad, pr.grad, torch.float64, n + ".grad")
    for (n, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
        assert torch.allclose(bf.double(), br.double(), rtol=1e-9, atol=1e-12), n


# timm architectures at reduced width/depth: convmixer_1536_20 (GELU, k9 p7),
# convmixer_768_32 (ReLU, k7 p7), convmixer_1024_20_ks9_p14 (GELU, k9 p14)
TIMM_ARCHS = [dict(k=9, patch=7, act=torch.nn.GELU), dict(k=7, patch=7, act=torch.nn.ReLU),
              dict(k=9, patch=14, act=torch.nn.GELU)]


@pytest.mark.parametrize("arch", TIMM_ARCHS, ids=["1536_20", "768_32", "1024_20_ks9_p14"])
@pytest.mark.parametrize("train", [True, False])
def test_convert_timm_model(arch, train):
    ref = _timm(**arch).double()
    fused = convert(copy.deepcopy(ref), backend="torch")
    assert all(isinstance(b, ConvMixerLayer) for b in fused.blocks)
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    _compare_whole(ref, fused, x, train)


def test_convert_reference_model_and_convmixer_state_dict():
    torch.manual_seed(0)
    ref = RefConvMixer(12, 2, kernel_size=5, patch_size=2, num_classes=7,
                       activation="gelu_tanh").double()
    randomize_bn(ref, 2)
    fused = ConvMixer(12, 2, kernel_size=5, patch_size=2, num_classes=7,
                      activation="gelu_tanh", backend="torch").double()
    fused.load_state_dict(ref.state_dict())
    timm_sd_keys = set(_timm(dim=12, k=5).state_dict())
    assert set(fused.state_dict()) == timm_sd_keys
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    _compare_whole(ref, fused, x, train=True)
    converted = convert(copy.deepcopy(ref), backend="torch")
    _compare_whole(ref, converted, x, train=False)


def test_convmixer_loads_timm_state_dict():
    t = _timm(dim=16, k=5)
    fused = ConvMixer(16, 2, kernel_size=5, patch_size=2, num_classes=10)
    fused.load_state_dict(t.state_dict())
    t.load_state_dict(fused.state_dict())


@pytest.mark.parametrize("backend", all_backends())
def test_whole_model_every_backend(backend):
    """A small ConvMixer on each backend vs the float64 reference, a training step."""
    torch.manual_seed(0)
    ref = RefConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=5)
    randomize_bn(ref, 3)
    fused = convert(copy.deepcopy(ref), backend=backend).to(DEVICE)
    ref = ref.double()
    x = torch.randn(2, 3, 8, 10).to(DEVICE)
    fused.train()
    ref.train()
    out_f = fused(x)
    out_r = ref(x.double().cpu())
    assert_close(out_f, out_r, torch.float32, "logits")


def test_available_backends_reports_each():
    av = convmixer_ext.available_backends()
    assert set(av) == {"cuda", "triton", "triton_tc", "cuda_emu", "torch", "eager"}
    assert av["torch"] is True and av["eager"] is True
    for name, v in av.items():
        assert v is True or (isinstance(v, str) and v), name
