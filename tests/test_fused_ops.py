"""Fused block ops (lens_fast.ops): every kernel backend against its reference,
forward and backward, plus dispatch, custom-op registration, torch.compile and the model
wiring (fused w1|w3, chained block loop, conformance, whole-model gradients).

On a CPU machine the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set
before anything imports triton) in float32, float16 and bfloat16 (no tl.dot in them, so
the interpreter's bf16 dot problem does not apply); the CUDA C++ kernels and Lens-size
shapes are checked by the @pytest.mark.cuda tests on a GPU (bench/gpu_check.sh). Buffers the
kernels are meant to fill are NaN-poisoned first, so an element a kernel forgets fails.
Tolerances: float32 within 1e-5 of the reference (relative to the output's scale);
16-bit within 2x the error of plain PyTorch in that dtype against a float32 truth, plus
a small slack (HALF_SLACK, same scale).
"""
import json
import os
import sys
import zlib

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lens_fast.models.embeddings import rope_table  # noqa: E402
from lens_fast.ops import dispatch, kernel_utils, optional  # noqa: E402
from lens_fast.ops.norm_modulate import (gated_residual_rms_norm_modulate,  # noqa: E402
                                         gated_residual_rms_norm_modulate_ref, layer_norm_modulate,
                                         layer_norm_modulate_ref, rms_norm, rms_norm_modulate, rms_norm_modulate_ref,
                                         rms_norm_ref)
from lens_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402
from lens_fast.ops.swiglu import silu_mul, silu_mul_ref, swiglu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
HALF_SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
needs_triton = pytest.mark.skipif(not optional.triton_usable(),
                                  reason="triton cannot run here (no GPU and TRITON_INTERPRET unset)")
ROPE_AXES = {16: (4, 6, 6), 32: (8, 12, 12), 48: (8, 20, 20), 64: (8, 28, 28), 128: (16, 56, 56)}


@pytest.fixture(autouse=True)
def _fresh(request, monkeypatch):
    """Fresh inputs per test (seeded from its name), poisoned outputs, no forced backend."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("LENS_FAST_ATTENTION", raising=False)


# ----------------------------------------------------------------------------- input specs
# An input is a base tensor (the autograd leaf) and a view of it: "contig", "slice" (a
# wider last dim, so rows are strided) or "transposed" (last stride not 1).

def _input(shape, layout="contig", scale=1.0, shift=0.0, offset=0):
    shape = tuple(shape)
    if layout == "contig":
        base = torch.randn(shape) * scale + shift
        return base, lambda t: t
    if layout == "slice":
        extra = offset + shape[-1] + 8
        base = torch.randn(*shape[:-1], extra) * scale + shift
        return base, lambda t: t[..., offset:offset + shape[-1]]
    if layout == "transposed":
        base = torch.randn(tuple(reversed(shape))) * scale + shift
        return base, lambda t: t.permute(*reversed(range(t.dim())))
    raise ValueError(layout)


def _run(fn, specs, dtype, grad_outs=None, seed=1):
    """fn(*views) with fresh leaves in ``dtype``: (outputs, grads w.r.t. the bases)."""
    leaves = [base.to(DEV, dtype).detach().requires_grad_() for base, _ in specs]
    outs = fn(*[view(leaf) for leaf, (_, view) in zip(leaves, specs)])
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outs is None:
        g = torch.Generator().manual_seed(seed)
        grad_outs = [torch.randn(o.shape, generator=g) for o in outs]
    torch.autograd.backward(outs, [go.to(DEV, o.dtype) for go, o in zip(grad_outs, outs)])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def _scaled_err(a, truth):
    a, truth = a.float(), truth.float()
    return ((a - truth).abs().max() / truth.abs().max().clamp_min(1e-6)).item()


def _check(fn, ref, specs, dtype, backend, monkeypatch):
    """``fn`` under ``backend`` against ``ref`` (torch backend) forward and backward."""
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    outs, grads = _run(fn, specs, dtype)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    for t in outs + grads:
        assert not t.isnan().any(), "a kernel left NaN (poisoned, unwritten) elements"
    if dtype == torch.float32:
        r_outs, r_grads = _run(ref, specs, torch.float32)
        for i, (a, b) in enumerate(zip(outs + grads, r_outs + r_grads)):
            assert _scaled_err(a, b) <= FP32_TOL, f"tensor {i}: {_scaled_err(a, b):.2e} > {FP32_TOL}"
        return
    t_outs, t_grads = _run(ref, specs, torch.float32)   # float32 truth
    p_outs, p_grads = _run(ref, specs, dtype)           # plain PyTorch in the low dtype
    for i, (a, p, t) in enumerate(zip(outs + grads, p_outs + p_grads, t_outs + t_grads)):
        mine, torch_err = _scaled_err(a, t), _scaled_err(p, t)
        assert mine <= 2 * torch_err + HALF_SLACK[dtype], \
            f"tensor {i}: error {mine:.2e} > 2 x PyTorch's {torch_err:.2e} + {HALF_SLACK[dtype]}"


# ----------------------------------------------------------------------------- op cases

def _qk_case(b, h, w, s, heads, d, layout):
    width = 3 * heads * d
    rope = rope_table(h, w, s, ROPE_AXES[d]).to(DEV)
    specs = [_input((b, h * w, width), layout), _input((b, s, width), "slice")]
    specs += [_input((d,), scale=0.1, shift=1.0) for _ in range(4)]

    def fn(img, txt, wq, wk, waq, wak):
        return qk_norm_rope(img, txt, heads, wq, wk, waq, wak, rope, 1e-6)

    def ref(img, txt, wq, wk, waq, wak):
        return qk_norm_rope_ref(img, txt, heads, wq, wk, waq, wak, rope, 1e-6)
    return fn, ref, specs


def _norm_case(op, b, l, c, layout):
    x = _input((b, l, c), layout)
    w = _input((c,), scale=0.1, shift=1.0)
    mod = lambda i: _input((b, c), "slice", scale=0.5, offset=i * c)  # noqa: E731 - chunks of [B, 6C]
    if op == "rms_norm":
        return (lambda x, w: rms_norm(x, w, 1e-5)), (lambda x, w: rms_norm_ref(x, w, 1e-5)), [x, w]
    if op == "rms_norm_modulate":
        return ((lambda *a: rms_norm_modulate(*a, 1e-6)), (lambda *a: rms_norm_modulate_ref(*a, 1e-6)),
                [x, w, mod(0), mod(1)])
    if op == "gated_residual_rms_norm_modulate":
        return ((lambda *a: gated_residual_rms_norm_modulate(*a, 1e-6)),
                (lambda *a: gated_residual_rms_norm_modulate_ref(*a, 1e-6)),
                [x, _input((b, l, c), "contig"), mod(2), w, mod(3), mod(4)])
    if op == "layer_norm_modulate":
        return ((lambda *a: layer_norm_modulate(*a, 1e-6)), (lambda *a: layer_norm_modulate_ref(*a, 1e-6)),
                [_input((b, l, c), layout, scale=2.0, shift=0.5), mod(0), mod(1)])
    raise ValueError(op)


def _swiglu_case(op, b, l, f, layout):
    if op == "silu_mul":
        return silu_mul, silu_mul_ref, [_input((b, l, f), layout, scale=2.0), _input((b, l, f), "slice")]
    return swiglu, (lambda h: silu_mul_ref(*h.chunk(2, dim=-1))), [_input((b, l, 2 * f), layout, scale=2.0)]


NORM_OPS = ["rms_norm", "rms_norm_modulate", "gated_residual_rms_norm_modulate", "layer_norm_modulate"]
# (batch, image grid h x w, text length, heads, head_dim, image layout)
QK_SHAPES = [(1, 1, 1, 1, 2, 16, "contig"), (3, 5, 7, 7, 3, 32, "slice"), (2, 5, 7, 77, 2, 64, "transposed"),
             (1, 64, 64, 333, 1, 32, "contig"), (2, 3, 4, 5, 2, 48, "contig")]  # 48: not a power of two
# (batch, rows, channels, layout): text lengths 1 / 77 / 333, image 5x7 (+7 text), 64x64 (+333)
NORM_SHAPES = [(1, 1, 64, "contig"), (3, 42, 96, "slice"), (2, 77, 200, "transposed"), (3, 333, 40, "slice"),
               (1, 4429, 64, "contig")]
SWIGLU_SHAPES = [(1, 1, 8, "contig"), (3, 35, 96, "slice"), (2, 333, 200, "transposed"), (1, 4096, 64, "contig")]
# bf16 too: these kernels have no tl.dot, whose bf16 is what the interpreter gets wrong.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=str)
def test_qk_norm_rope_triton_matches_reference(shape, dtype, monkeypatch):
    _check(*_qk_case(*shape), dtype, "triton", monkeypatch)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_ops_triton_match_reference(op, shape, dtype, monkeypatch):
    _check(*_norm_case(op, *shape), dtype, "triton", monkeypatch)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["silu_mul", "swiglu"])
def test_swiglu_triton_matches_reference(op, shape, dtype, monkeypatch):
    _check(*_swiglu_case(op, *shape), dtype, "triton", monkeypatch)


def test_rms_norm_any_leading_dims_and_no_weight(monkeypatch):
    """The txt_norm path: [B, S, C] and 2-D inputs; weight None normalises only."""
    for backend in (["triton"] if optional.triton_usable() else []) + ["torch"]:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
        x = torch.randn(5, 2880, device=DEV)
        torch.testing.assert_close(rms_norm(x, None, 1e-5), rms_norm_ref(x, None, 1e-5),
                                   rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, 7, 2880, device=DEV)
        w = torch.rand(2880, device=DEV) + 0.5
        torch.testing.assert_close(rms_norm(x3, w, 1e-5), rms_norm_ref(x3, w, 1e-5), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch

def _probe_inputs():
    x = torch.randn(2, 3, 16)
    v = torch.randn(2, 16)
    return x, v


def test_auto_picks_torch_on_cpu_and_forcing_works(monkeypatch):
    x, v = _probe_inputs()
    w = torch.ones(16)
    for op in NORM_OPS[1:3]:
        assert dispatch.select(op, x, None, None, w, v, v) == "torch"
    assert dispatch.select("silu_mul", x, x) == "torch"
    if optional.triton_usable():
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        assert dispatch.select("rms_norm_modulate", x, None, None, w, v, v) == "triton"
        # Mixed dtypes have no kernel: forced triton falls down to the reference (logged once).
        assert dispatch.select("rms_norm_modulate", x, None, None, w.double(), v, v) == "torch"
    for op in ("qk_norm_rope", "qk_norm_rope_backward", "norm_modulate_backward", "swiglu", "swiglu_backward"):
        assert dispatch.backends(op)[-1] == "torch"
    assert dispatch.backends("qk_norm_rope") == ["cuda", "triton", "torch"]
    assert dispatch.backends("layer_norm_modulate") == ["cuda", "triton", "torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_forced_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    x, v = _probe_inputs()
    with pytest.raises(dispatch.BackendUnavailableError, match="LENS_FAST_BACKEND=cuda"):
        rms_norm_modulate(x, torch.ones(16), v, v, 1e-6)


def test_bad_shapes_name_the_value():
    x, v = _probe_inputs()
    with pytest.raises(ValueError, match=r"shift has shape \(3, 16\); expected per-sample \[B=2, C=16\]"):
        rms_norm_modulate(x, torch.ones(16), v[:1].expand(3, 16), v, 1e-6)
    with pytest.raises(ValueError, match=r"weight has shape \(8,\); expected \[C=16\]"):
        rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="expected an even size"):
        swiglu(torch.randn(2, 7))
    rope = rope_table(1, 2, 3, (4, 6, 6))
    qkv = torch.randn(1, 2, 3 * 2 * 16)
    with pytest.raises(ValueError, match=r"rope is torch.float32 \(5, 8, 2\); expected float32 \[N \+ S = 4"):
        qk_norm_rope(qkv, torch.randn(1, 2, 96), 2, *[torch.ones(16)] * 4, rope)
    with pytest.raises(ValueError, match="3 \\* heads \\(5\\)"):
        qk_norm_rope(qkv, qkv, 5, *[torch.ones(16)] * 4, rope)


def test_poisoned_buffers_are_nan(monkeypatch):
    t = kernel_utils.empty((3, 4), torch.float16, "cpu")
    assert t.isnan().all()
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", False)
    assert kernel_utils.empty((2,), torch.float32, "cpu").shape == (2,)


# ----------------------------------------------------------------------------- custom ops

def _opcheck_cases():
    from lens_fast.ops import norm_modulate as nm, qk_norm_rope as qk, swiglu as sw
    b, l, c = 2, 5, 32
    leaf = lambda *shape: torch.randn(*shape, device=DEV).requires_grad_()  # noqa: E731
    x, y, m, w = leaf(b, l, c), leaf(b, l, c), leaf(b, 6 * c), leaf(c)
    rope = rope_table(1, 3, 2, ROPE_AXES[16]).to(DEV)
    return [(nm.rms_norm_op, (x, w, 1e-5)), (nm.rms_norm_op, (x, None, 1e-5)),
            (nm.rms_norm_modulate_op, (x, w, m[:, :c], m[:, c:2 * c], 1e-6)),
            (nm.gated_residual_rms_norm_modulate_op, (x, y, m[:, :c], w, m[:, c:2 * c], m[:, 2 * c:3 * c], 1e-6)),
            (nm.layer_norm_modulate_op, (x, m[:, :c], m[:, c:2 * c], 1e-6)),
            (sw.silu_mul_op, (x, y)), (sw.swiglu_op, (leaf(b, l, 2 * c),)),
            (qk.qk_norm_rope_op, (leaf(b, 3, 96), leaf(b, 2, 96), 2, *[leaf(16) for _ in range(4)], rope, 1e-6))]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_custom_ops_pass_opcheck(backend, monkeypatch):
    """Schema, fake (meta) outputs matching the real ones, autograd registration and
    AOT dispatch, for every op, with the given backend running inside."""
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


def _tiny_block_inputs(dim=64, heads=2, b=2, h=3, w=5, s=7):
    from lens_fast.models.transformer import LensTransformerBlock
    block = LensTransformerBlock(dim, heads, dim // heads, True, True).to(DEV)
    img = torch.randn(b, h * w, dim, device=DEV)
    txt = torch.randn(b, s, dim, device=DEV)
    temb = torch.randn(b, dim, device=DEV)
    rope = rope_table(h, w, s, ROPE_AXES[dim // heads]).to(DEV)
    mask = torch.ones(b, s, dtype=torch.bool, device=DEV)
    mask[1] = False  # a fully masked text row (the empty negative prompt)
    return block, (img, txt, temb, rope, mask)


def _block_grads(fn, block, inputs):
    img, txt = (t.clone().requires_grad_() for t in inputs[:2])
    block.zero_grad(set_to_none=True)
    out_img, out_txt = fn(img, txt, *inputs[2:])
    (out_img.square().mean() + out_txt.square().mean()).backward()
    return [out_img.detach(), out_txt.detach(), img.grad, txt.grad] + [p.grad.clone() for p in block.parameters()]


def test_block_compiles_fullgraph_with_the_custom_ops():
    """torch.compile(fullgraph=True) of a whole block (every fused op + attention) traces
    without a graph break and gives the eager numbers, forward and backward. aot_eager
    keeps it quick on 2 cores; it exercises the same fake/autograd registrations."""
    torch._dynamo.reset()
    block, inputs = _tiny_block_inputs()
    eager = _block_grads(block, block, inputs)
    compiled = _block_grads(torch.compile(block, fullgraph=True, backend="aot_eager"), block, inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the model

def _conformance(conformance_dir):
    d = load_file(os.path.join(conformance_dir, "transformer_case.safetensors"))
    with open(os.path.join(conformance_dir, "transformer_case.json")) as f:
        shapes = json.load(f)["img_shapes"]
    return d, shapes


@needs_triton
@pytest.mark.parametrize("masked", [True, False])
def test_conformance_with_triton_backend(conformance_dir, masked, monkeypatch):
    from lens_fast import LensTransformer2DModel
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    model = LensTransformer2DModel.from_pretrained(os.path.join(conformance_dir, "transformer")).to(DEV)
    d, shapes = _conformance(conformance_dir)
    d = {k: v.to(DEV) for k, v in d.items()}
    with torch.no_grad():
        out = model(d["hidden_states"], [d["feat0"], d["feat1"], d["feat2"]], d["mask"].bool() if masked else None,
                    d["timestep"], shapes).sample
    expected = d["expected" if masked else "expected_nomask"]
    assert _scaled_err(out, expected) <= 1e-4


@needs_triton
def test_every_parameter_gradient_equal_between_torch_and_triton(monkeypatch):
    """A small random Lens (fully masked text row included): the loss gradient of every
    parameter, with every fused op (and attention) on Triton, equals the reference's."""
    from lens_fast.tiny import make_tiny_transformer
    model = make_tiny_transformer(seed=5).to(DEV).train()
    b, h, w, s = 3, 5, 7, 7
    c = model.config
    x = torch.randn(b, h * w, c.in_channels, device=DEV)
    feats = [torch.randn(b, s, c.enc_hidden_dim, device=DEV) for _ in c.selected_layer_index]
    mask = torch.ones(b, s, dtype=torch.bool, device=DEV)
    mask[1] = False
    mask[2, 4:] = False
    sigma = torch.rand(b, device=DEV)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
        model.zero_grad(set_to_none=True)
        model(x, feats, mask, sigma, [(1, h, w)]).sample.square().mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads["triton"].keys() and len(grads["torch"]) > 40
    for name, g in grads["torch"].items():
        assert _scaled_err(grads["triton"][name], g) <= 1e-4, name


def test_fuse_projections_keeps_official_keys_and_outputs(tmp_path):
    from lens_fast import LensTransformer2DModel
    from lens_fast.tiny import make_tiny_transformer
    model = make_tiny_transformer(seed=2)
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 15, 128)
    feats = [torch.randn(2, 7, 40) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 2:] = False
    args = (x, feats, mask, torch.rand(2), [(1, 3, 5)])
    with torch.no_grad():
        before = model(*args).sample
        model.fuse_projections().fuse_projections()  # idempotent
        after = model(*args).sample
    mlp = model.transformer_blocks[0].img_mlp
    assert mlp.fused and not hasattr(mlp, "w1") and tuple(mlp.w13.weight.shape) == (2 * mlp.hidden, 64)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    sd = model.state_dict()
    assert sd.keys() == ref_sd.keys() and not any("w13" in k for k in sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    model.save_pretrained(tmp_path / "fused")
    plain = LensTransformer2DModel.from_pretrained(tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(plain(*args).sample, before, rtol=1e-5, atol=1e-6)
    # Official w1/w3 keys load into a fused model, and land in w13.
    fused_again = make_tiny_transformer(seed=9).fuse_projections()
    fused_again.load_state_dict(ref_sd)
    w13 = fused_again.transformer_blocks[1].txt_mlp.w13.weight
    torch.testing.assert_close(w13, torch.cat([ref_sd["transformer_blocks.1.txt_mlp.w1.weight"],
                                               ref_sd["transformer_blocks.1.txt_mlp.w3.weight"]]))


def test_chained_block_loop_matches_calling_blocks(monkeypatch):
    """The loop that fuses block i's MLP residual with block i+1's norm1 is the same math
    (bit for bit on the reference backend); it is skipped where it would bypass __call__."""
    from lens_fast.models.transformer import LensTransformerBlock
    from lens_fast.tiny import make_tiny_transformer
    model = make_tiny_transformer(seed=4, num_layers=3)
    args = (torch.randn(2, 15, 128), [torch.randn(2, 7, 40) for _ in range(3)],
            torch.tensor([[True] * 7, [False] * 7]), torch.rand(2), [(1, 3, 5)])
    calls = []
    real = LensTransformerBlock.exit_into
    monkeypatch.setattr(LensTransformerBlock, "exit_into", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        chained = model(*args).sample
        assert len(calls) == 2
        handle = model.transformer_blocks[1].register_forward_hook(lambda *a: None)
        per_block = model(*args).sample
        handle.remove()
    assert len(calls) == 2, "a hooked block must be called through __call__"
    assert torch.equal(chained, per_block)
    assert not model._can_chain_blocks(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float16))
    model.enable_gradient_checkpointing()
    assert not model._can_chain_blocks(args[0], args[0])


# ----------------------------------------------------------------------------- GPU (bf16, CUDA C++)
# Lens 1024x1024 shapes: batch 2, 4096 image + 256 text tokens, 24 heads x 64, dim 1536.
GPU_CASES = {
    "qk_norm_rope": lambda: _qk_case(2, 64, 64, 256, 24, 64, "contig"),
    "rms_norm_modulate": lambda: _norm_case("rms_norm_modulate", 2, 4096, 1536, "contig"),
    "gated_residual_rms_norm_modulate": lambda: _norm_case("gated_residual_rms_norm_modulate", 2, 4096, 1536,
                                                           "contig"),
    "layer_norm_modulate": lambda: _norm_case("layer_norm_modulate", 2, 4096, 1536, "contig"),
    "rms_norm": lambda: _norm_case("rms_norm", 2, 256, 2880, "slice"),
    "silu_mul": lambda: _swiglu_case("silu_mul", 2, 4096, 4096, "contig"),
    "swiglu": lambda: _swiglu_case("swiglu", 2, 4096, 4096, "contig"),
}
CUDA_OPS = ("qk_norm_rope", "rms_norm_modulate", "gated_residual_rms_norm_modulate", "layer_norm_modulate", "rms_norm")


def _require_extension():
    if optional.cuda_extension() is None:
        if os.environ.get("LENS_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail("lens_fast._C is not importable although LENS_FAST_REQUIRE_CUDA_EXT=1 (build failed?)")
        pytest.skip("lens_fast._C is not built (pip install --no-build-isolation -e . on a CUDA machine)")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,op", [("triton", op) for op in GPU_CASES] + [("cuda", op) for op in CUDA_OPS])
def test_gpu_ops_at_lens_shapes(backend, op, dtype, monkeypatch):
    """Forward on the named backend (backward: Triton, the only kernel backward) vs the
    reference in float32, at Lens shapes, in bf16 and fp16."""
    if backend == "cuda":
        _require_extension()
    fn, ref, specs = GPU_CASES[op]()
    probe = [view(base.to(DEV, dtype)) for base, view in specs]
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    if op == "qk_norm_rope":
        picked = dispatch.select(op, probe[0], probe[1], 24, *probe[2:])
    elif op in ("silu_mul", "swiglu"):
        picked = dispatch.select(op, *probe)
    else:
        x, rest = probe[0], probe[1:]
        named = dict(zip({"rms_norm": ["weight"], "rms_norm_modulate": ["weight", "shift", "scale"],
                          "gated_residual_rms_norm_modulate": ["y", "gate", "weight", "shift", "scale"],
                          "layer_norm_modulate": ["shift", "scale"]}[op], rest))
        picked = dispatch.select(op, x.reshape(1, -1, x.shape[-1]) if op == "rms_norm" else x,
                                 named.get("y"), named.get("gate"), named.get("weight"), named.get("shift"),
                                 named.get("scale"))
    assert picked == backend
    _check(fn, ref, specs, dtype, backend, monkeypatch)


@pytest.mark.cuda
def test_gpu_model_backends_agree_bf16(monkeypatch):
    """A 2-block Lens-width model (dim 1536, 24 heads) at 32x32 latents with a fully
    masked text row: bf16 on the auto backends (CUDA C++ / Triton kernels) is within 2x
    the error of the bf16 reference path, both against the float32 reference."""
    from lens_fast.tiny import make_tiny_transformer
    model = make_tiny_transformer(seed=1, num_layers=2, num_attention_heads=24, attention_head_dim=64,
                                  inner_dim=1536, axes_dims_rope=[8, 28, 28]).to(DEV)
    b, h, w, s = 2, 32, 32, 77
    x = torch.randn(b, h * w, 128, device=DEV)
    feats = [torch.randn(b, s, 40, device=DEV) for _ in range(3)]
    mask = torch.ones(b, s, dtype=torch.bool, device=DEV)
    mask[1] = False
    sigma = torch.rand(b, device=DEV)
    outs = {}
    for backend, dtype in (("torch", torch.float32), ("torch", torch.bfloat16), ("auto", torch.bfloat16)):
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
        model.to(dtype)
        with torch.no_grad():
            out = model(x.to(dtype), [f.to(dtype) for f in feats], mask, sigma.to(dtype), [(1, h, w)]).sample
        outs[(backend, dtype)] = out.float()
    truth = outs[("torch", torch.float32)]
    mine, plain = (_scaled_err(outs[(k, torch.bfloat16)], truth) for k in ("auto", "torch"))
    assert mine <= 2 * plain + HALF_SLACK[torch.bfloat16], f"auto bf16 {mine:.2e} vs reference bf16 {plain:.2e}"
