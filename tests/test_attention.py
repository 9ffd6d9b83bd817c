"""Joint attention: every backend against the math reference, text padding included.

On a CPU machine the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set
below before anything imports triton), in float32/float16 only (interpreted bf16 dots are
wrong); bf16 and FP8 are checked by the @pytest.mark.cuda tests on a GPU. Outputs and
gradients are compared with a float64 reference; kernel outputs are written into
NaN-filled buffers so an element the kernel forgets to write fails the test.
"""
import json
import os
import subprocess
import sys
import zlib

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lens_fast.ops import attention as A  # noqa: E402
from lens_fast.ops import dispatch, optional  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not optional.triton_usable(),
                                  reason="triton cannot run here (no GPU and TRITON_INTERPRET unset)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32_TOL = 2e-5   # max error / max |reference|, float32 kernels vs the float64 reference
HALF_ATOL = 2e-4  # absolute slack on top of "2x plain PyTorch's error" for 16-bit dtypes


@pytest.fixture(autouse=True)
def _fresh_seed(request, monkeypatch):
    """Fresh inputs per test, reproducible from its name; backend env vars cleared."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def _single_thread_blas():
    """The interpreter runs tl.dot as small numpy matmuls; multi-threaded OpenBLAS on a busy
    2-core box made one 128x64x128 product take 9-57 ms instead of 0.06 ms (measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def make_qkv(B, L, H, D, dtype=torch.float32, layout="qkv", device=DEV):
    """Non-contiguous q, k, v [B, L, H, D]: slices of a fused [B, L, 3, H, D] buffer, or
    transposes of [B, H, L, D] tensors."""
    if layout == "qkv":
        return torch.randn(B, L, 3, H, D, device=device).to(dtype).unbind(2)
    if layout == "heads_first":
        return tuple(torch.randn(B, H, L, D, device=device).to(dtype).transpose(1, 2) for _ in range(3))
    raise ValueError(f"layout {layout!r}; expected 'qkv' or 'heads_first'")


def make_mask(B, S, kind, device=DEV):
    """random: any pattern, density per row, last row fully masked when B > 1;
    prefix: right padding with random lengths; empty: all masked; none: None."""
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(B, S) < torch.rand(B, 1).clamp(0.2, 0.9)
        if B > 1:
            m[-1] = False
    elif kind == "prefix":
        lengths = torch.randint(0, S + 1, (B,))
        lengths[0] = S
        m = torch.arange(S)[None, :] < lengths[:, None]
    elif kind == "empty":
        m = torch.zeros(B, S, dtype=torch.bool)
    else:
        raise ValueError(f"mask kind {kind!r}")
    return m.to(device)


def reference(q, k, v, mask, n_img, dout):
    """float64 truth: output and (dq, dk, dv)."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = A.joint_attention_ref(qd, kd, vd, mask, n_img, upcast=False)
    out.backward(dout.double())
    return out.detach(), (qd.grad, kd.grad, vd.grad)


def assert_close(name, got, ref, tol=FP32_TOL):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite elements"
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(ref.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


# ----------------------------------------------------------------------------- Triton kernels

CASES = [  # B, n_img, S, H, D, mask kind, layout
    (1, 1, 0, 2, 64, "random", "qkv"),            # one image token, no text at all
    (2, 1, 1, 1, 32, "random", "qkv"),            # text length 1, second row fully masked
    (3, 37, 77, 2, 64, "random", "heads_first"),  # batch 3, odd image length, holes in text
    (2, 130, 77, 1, 128, "prefix", "qkv"),        # head_dim 128, right padding
    (2, 64, 333, 1, 32, "random", "qkv"),         # long text, image length = one block
    (3, 5, 77, 1, 128, "none", "heads_first"),    # no mask, L not a multiple of the block
    (2, 191, 333, 1, 64, "empty", "qkv"),         # every text token masked (empty prompts)
    (1, 33, 7, 1, 16, "random", "heads_first"),   # head_dim 16
]


@needs_triton
@pytest.mark.parametrize("B,n_img,S,H,D,kind,layout", CASES)
def test_triton_kernels_match_reference_fp32(B, n_img, S, H, D, kind, layout):
    fa = A._kernels()
    q, k, v = make_qkv(B, n_img + S, H, D, layout=layout)
    mask = make_mask(B, S, kind)
    dout = torch.randn(B, n_img + S, H, D, device=DEV)
    poison = lambda *shape: torch.full(shape, float("nan"), device=DEV)  # noqa: E731
    out, lse = fa.attention_forward(q, k, v, mask, n_img=n_img, out=poison(*q.shape),
                                    lse=poison(B, H, n_img + S))
    grads = fa.attention_backward(dout, q, k, v, out, lse, mask, n_img=n_img,
                                  grads=tuple(poison(*q.shape) for _ in range(3)))
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)


@needs_triton
@pytest.mark.parametrize("B,n_img,S,D,kind", [(1, 3001, 333, 32, "random"), (2, 2048, 77, 64, "prefix")])
def test_triton_kernels_long_image_sequences(B, n_img, S, D, kind):
    """Lens-sized image lengths (128-row blocks keep the interpreter quick)."""
    fa = A._kernels()
    cfg = fa.Config(128, 128, 4, 1)
    q, k, v = make_qkv(B, n_img + S, 1, D)
    mask = make_mask(B, S, kind)
    dout = torch.randn_like(q)
    out, lse = fa.attention_forward(q, k, v, mask, n_img=n_img, config=cfg)
    grads = fa.attention_backward(dout, q, k, v, out, lse, mask, n_img=n_img,
                                  dkdv_config=cfg, dq_config=cfg)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)


@needs_triton
def test_fully_masked_text_row_equals_image_only_attention():
    """An empty negative prompt attends to the image keys alone; its padded keys get zero
    gradient; garbage (NaN) in padded key/value rows never reaches any result."""
    B, n_img, S, H, D = 2, 45, 77, 2, 32
    q, k, v = (t.clone() for t in make_qkv(B, n_img + S, H, D))
    mask = make_mask(B, S, "random")  # row 1 fully masked, row 0 has holes
    pad = ~A.key_valid_mask(mask, n_img)
    for t in (k, v):
        t[pad] = float("nan")
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    for backend in ("triton", "sdpa"):
        out = A.joint_attention(q, k, v, mask, n_img=n_img, backend=backend)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        alone = torch.softmax(torch.einsum("lhd,mhd->hlm", q[1], k[1, :n_img]) * D ** -0.5, -1)
        alone = torch.einsum("hlm,mhd->lhd", alone, v[1, :n_img])
        assert_close(f"{backend} image-only row", out[1], alone)
        clean = [q.detach()] + [torch.where(pad[..., None, None], 0.0, t.detach()) for t in (k, v)]
        ref_out, ref_grads = reference(*clean, mask, n_img, torch.ones_like(out))
        assert_close(f"{backend} out", out, ref_out)
        for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
            assert_close(f"{backend} {name}", g, r)
        assert (dk[pad] == 0).all() and (dv[pad] == 0).all(), f"{backend}: padded keys got gradient"


@needs_triton
def test_key_lengths_bound_the_key_loop():
    fa = A._kernels()
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert fa.key_lengths(mask, 7).tolist() == [10, 7, 12]
    # Small blocks so many text key blocks lie past the bound of the second row.
    B, n_img, S, H, D = 2, 20, 90, 1, 16
    q, k, v = (t.clone() for t in make_qkv(B, n_img + S, H, D))
    mask = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    mask[0, :70], mask[1, :3] = True, True
    k[1, n_img + 3:], v[1, n_img + 3:] = float("nan"), float("nan")  # never read when skipped
    cfg = fa.Config(16, 16, 4, 1)
    out, lse = fa.attention_forward(q, k, v, mask, n_img=n_img, config=cfg)
    dout = torch.randn_like(out)
    grads = fa.attention_backward(dout, q, k, v, out, lse, mask, n_img=n_img, dkdv_config=cfg,
                                  dq_config=cfg)
    k[1, n_img + 3:], v[1, n_img + 3:] = 0.0, 0.0
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)


def _half_errors(fn, q, k, v, mask, n_img, dout):
    """Max abs errors of (out, dq, dk, dv) of ``fn`` against the float64 truth."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    return [(x.double() - r).abs().max().item() for x, r in zip((out, *grads), (ref_out, *ref_grads))]


def check_half_precision(backend, dtype, B, n_img, S, H, D, kind):
    q, k, v = make_qkv(B, n_img + S, H, D, dtype=dtype)
    mask = make_mask(B, S, kind)
    dout = torch.randn(B, n_img + S, H, D, device=DEV).to(dtype)
    got = _half_errors(lambda a, b, c: A.joint_attention(a, b, c, mask, n_img=n_img, backend=backend),
                       q, k, v, mask, n_img, dout)
    base = _half_errors(lambda a, b, c: A.joint_attention_ref(a, b, c, mask, n_img, upcast=False),
                        q, k, v, mask, n_img, dout)
    for name, e, eb in zip(("out", "dq", "dk", "dv"), got, base):
        assert e <= 2 * eb + HALF_ATOL, f"{backend} {dtype} {name}: error {e:.3e} > 2 x PyTorch's {eb:.3e} + atol"


@needs_triton
@pytest.mark.parametrize("D", [32, 64, 128])
def test_triton_fp16_within_twice_pytorch_error(D):
    check_half_precision("triton", torch.float16, 2, 61, 77, 2, D, "random")


@pytest.mark.parametrize("backend,layout", [("sdpa", "qkv"), ("torch", "heads_first"), ("sdpa", "heads_first")])
@pytest.mark.parametrize("kind", ["random", "prefix", "none"])
def test_math_backends_match_reference(backend, layout, kind):
    B, n_img, S, H, D = 3, 29, 33, 2, 32
    q, k, v = make_qkv(B, n_img + S, H, D, layout=layout)
    mask = make_mask(B, S, kind)
    dout = torch.randn(B, n_img + S, H, D, device=DEV)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = A.joint_attention(*leaves, mask, n_img=n_img, backend=backend)
    assert out.is_contiguous() and out.dtype == q.dtype
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)


def test_sdpa_fp16_within_twice_pytorch_error():
    check_half_precision("sdpa", torch.float16, 2, 40, 33, 2, 64, "random")


# ----------------------------------------------------------------------------- packing

def dense_flash_ref(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_func's contract in torch math (for testing the packing on CPU)."""
    assert not causal
    s = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * softmax_scale
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.float()).to(q.dtype)


def varlen_flash_ref(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in torch math, segment by segment."""
    assert not causal and cu_q.dtype == cu_k.dtype == torch.int32
    out = torch.empty_like(q)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        assert qs.stop - qs.start <= max_q and ks.stop - ks.start <= max_k
        out[qs] = dense_flash_ref(q[None, qs], k[None, ks], v[None, ks], softmax_scale)[0]
    return out, None  # FlashAttention-3 style (out, lse)


def test_pack_valid_keys_layout():
    B, n_img, S, H, D = 3, 4, 5, 1, 2
    k, v = torch.randn(B, n_img + S, H, D), torch.randn(B, n_img + S, H, D)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    packed = A.pack_valid_keys(k, v, mask, n_img)
    assert packed.cu_seqlens.tolist() == [0, 6, 10, 17] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 7
    rows = [0, 1, 2, 3, 4, 5] + [9, 10, 11, 12] + [18, 19, 20, 21, 23, 25, 26]
    assert packed.index.tolist() == rows
    assert torch.equal(packed.k, k.reshape(-1, H, D)[rows]) and torch.equal(packed.v, v.reshape(-1, H, D)[rows])


@pytest.mark.parametrize("kind", ["random", "none", "empty"])
def test_flash_path_packing_matches_reference(kind):
    B, n_img, S, H, D = 3, 21, 19, 2, 32
    q, k, v = make_qkv(B, n_img + S, H, D, layout="heads_first")
    mask = make_mask(B, S, kind)
    dout = torch.randn(B, n_img + S, H, D, device=DEV)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = A._attn_flash(*leaves, mask, n_img, funcs=(dense_flash_ref, varlen_flash_ref))
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)


def test_sdpa_key_runs_group_and_cache():
    n_img = 3
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    plan = A._key_runs(mask, n_img)
    assert [(b0, b1) for b0, b1, _ in plan] == [(0, 2), (2, 3), (3, 4)]
    assert plan[0][2] == slice(0, 5) and plan[1][2] == slice(0, 3)
    assert plan[2][2].tolist() == [0, 1, 2, 3, 5]
    assert A._key_runs(mask, n_img) is plan, "same mask object and version must hit the cache"
    mask[2, 0] = True  # in-place edit bumps the version: the plan is rebuilt
    assert [(b0, b1) for b0, b1, _ in A._key_runs(mask, n_img)] == [(0, 2), (2, 3), (3, 4)]
    assert A._key_runs(mask, n_img)[1][2] == slice(0, 4)


# ----------------------------------------------------------------------------- selection, API

def test_selection_rules(monkeypatch):
    q = torch.randn(1, 10, 2, 32, device=DEV)
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEV)
    assert A.select_backend(q, q, q, mask) == "sdpa", "auto must pick sdpa for fp32 (and on any CPU)"
    assert A.select_backend(q.cpu(), q.cpu(), q.cpu(), mask.cpu()) == "sdpa"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert A.select_backend(q, q, q, mask) == "torch"
    if optional.triton_usable():
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        assert A.select_backend(q, q, q, mask) == "triton"
    monkeypatch.setenv(A.ATTENTION_ENV, "torch")  # the attention override wins
    assert A.select_backend(q, q, q, mask) == "torch"
    assert A.select_backend(q, q, q, mask, backend="sdpa") == "sdpa"  # the argument wins
    monkeypatch.setenv(A.ATTENTION_ENV, "flashy")
    with pytest.raises(ValueError, match="flashy"):
        A.select_backend(q, q, q, mask)
    if not A._flash_available():
        monkeypatch.setenv(A.ATTENTION_ENV, "flash_attn")
        with pytest.raises(dispatch.BackendUnavailableError, match="flash_attn"):
            A.joint_attention(q, q, q, mask, n_img=6)
    monkeypatch.setenv(A.ATTENTION_ENV, "triton")
    with pytest.raises(dispatch.BackendUnavailableError, match="head_dim 24"):
        A.joint_attention(*(torch.randn(1, 10, 2, 24, device=DEV) for _ in range(3)), mask, n_img=6)


def test_invalid_inputs_name_the_bad_value():
    q = torch.randn(2, 10, 2, 16)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        A.joint_attention(q, q, q, torch.ones(2, 5, dtype=torch.bool), n_img=6)
    with pytest.raises(ValueError, match="n_img=11"):
        A.joint_attention(q, q, q, None, n_img=11)
    with pytest.raises(ValueError, match="n_img=0"):
        A.joint_attention(q, q, q, torch.ones(2, 10, dtype=torch.bool), n_img=0)
    with pytest.raises(ValueError, match="float16"):
        A.joint_attention(q, q, q.half(), None, n_img=10)
    with pytest.raises(ValueError, match="float32"):
        A.joint_attention(q, q, q, torch.ones(2, 4), n_img=6)


def test_integer_mask_is_accepted_like_bool():
    q, k, v = make_qkv(2, 12, 1, 16)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.uint8)
    got = A.joint_attention(q, k, v, mask, n_img=8, backend="sdpa")
    assert_close("out", got, A.joint_attention_ref(q, k, v, mask.bool(), 8))


@needs_triton
def test_torch_compile_fullgraph_triton_backend():
    B, n_img, S, H, D = 2, 9, 7, 2, 16
    q, k, v = make_qkv(B, n_img + S, H, D)
    mask = make_mask(B, S, "random")

    def block(q, k, v, mask):
        return A.joint_attention(q, k, v, mask, n_img=n_img, backend="triton").flatten(2) * 2

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(block, fullgraph=True)(*leaves, mask)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, torch.full_like(q, 2.0))
    assert_close("out", out, 2 * ref_out.flatten(2))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)
    # Dynamic shapes (symbolic n_img, L and head_dim): one graph serves two image sizes.
    dynamic = torch.compile(lambda q, k, v, m: A.joint_attention(q, k, v, m, n_img=q.shape[1] - m.shape[1],
                                                                 backend="triton"),
                            fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (n_img, n_img + 4):
        q, k, v = make_qkv(B, n + S, H, D)
        assert_close(f"dynamic n_img={n}", dynamic(q, k, v, mask), A.joint_attention_ref(q, k, v, mask, n))


# ----------------------------------------------------------------------------- FP8, AOT, bench

@needs_triton
def test_fp8_kernel_matches_its_emulation_and_reports_error():
    from lens_fast.kernels import fp8_attention as f8
    B, n_img, S, H, D = 2, 40, 30, 2, 32
    q, k = (t.contiguous() for t in make_qkv(B, n_img + S, H, D)[:2])
    v = torch.randn(B, n_img + S, H, D, device=DEV).half()  # fp16: bf16 dots fail interpreted
    mask = make_mask(B, S, "random")
    out = f8.fp8_attention(q, k, v, mask, n_img=n_img, out=torch.full_like(v, float("nan")))
    emulated = f8.fp8_attention_ref(q, k, v, mask, n_img=n_img)
    assert_close("fp8 out vs emulation", out, emulated, tol=2e-3)  # p is rounded to fp16 for P@V
    report = f8.fp8_attention_error(q, k, v, mask, n_img=n_img)
    assert 0 < report["fp8_vs_fp32"] < 0.1, report
    assert report["fp8_vs_fp32"] > report["16bit_vs_fp32"], report


AOT_SCRIPT = r"""
import json, torch
from lens_fast.kernels import flash_attention as fa
rows = []
for arch in (90, 80):
    for kind, table in fa.CONFIG_TABLES.items():
        for d in (32, 64, 128):
            c, use = fa.aot_compile(kind, d, torch.bfloat16, arch, table[(arch, d)])
            rows.append(dict(arch=arch, kind=kind, head_dim=d, dtype="bf16", wgmma="wgmma" in c.asm["ptx"], **use))
for kind, dtype, qk_fp8 in (("fwd", torch.float16, True), ("fwd", torch.float32, False)):
    c, use = fa.aot_compile(kind, 64, dtype, 90, fa.FP32_CONFIG if dtype == torch.float32 else fa.FWD_CONFIGS[(90, 64)],
                            qk_fp8=qk_fp8)
    rows.append(dict(arch=90, kind=kind + ("_fp8" if qk_fp8 else ""), head_dim=64, dtype=str(dtype),
                     wgmma="wgmma" in c.asm["ptx"], **use))
print(json.dumps(rows))
"""


def test_shipped_configs_compile_for_sm90_and_sm80_without_spills():
    """AOT-compile every shipped config at Lens head dims (no GPU needed): no register
    spills, shared memory within the card's limit, Hopper code on tensor-core wgmma."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=170)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 20
    smem_limit = {90: 227 * 1024, 80: 163 * 1024}
    for r in rows:
        print(r)
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        assert r["shared_bytes"] <= smem_limit[r["arch"]], f"shared memory over the sm_{r['arch']} limit: {r}"
        assert r["regs"] <= 255, r
        if r["arch"] == 90 and r["dtype"] != "torch.float32":
            assert r["wgmma"], f"sm_90 kernel without wgmma: {r}"


def test_bench_dry_run(tmp_path):
    out = tmp_path / "attention.json"
    env = dict(os.environ)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "attention.py"), "--dry-run",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    backends = {c["backend"] for c in result["cases"]}
    assert {"torch", "sdpa"} <= backends, backends
    for case in result["cases"]:
        assert case["median_ms"] > 0 and case["tflops"] > 0 and 0 < case["pct_of_best"] <= 100, case
    assert "auto_within_5pct" in result["checks"][0], result["checks"]


# ----------------------------------------------------------------------------- key limits (txt_len)
# Per-row key limits instead of a dense mask: what the engine passes where the reference
# has no mask (its own text-bucket padding) and for prefix masks. Exact: the same numbers
# as the equivalent prefix mask (bit for bit on SDPA, which runs the same key slices, and
# on the Triton kernel, which runs the same key bound without reading mask bytes).

def _lengths(B, S):
    lengths = torch.randint(0, S + 1, (B,))
    lengths[0] = S
    lengths[-1] = 0  # an empty negative prompt: image keys only
    return lengths.to(DEV)


@pytest.mark.parametrize("backend", ["torch", "sdpa", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("B,n_img,S,H,D", [(3, 37, 77, 2, 64), (2, 70, 130, 1, 32)])
def test_key_limits_equal_the_reference_and_the_prefix_mask(backend, B, n_img, S, H, D):
    q, k, v = make_qkv(B, n_img + S, H, D)
    lengths = _lengths(B, S)
    mask = A.prefix_mask(lengths, S)
    dout = torch.randn(B, n_img + S, H, D, device=DEV)

    def run(**text):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = A.joint_attention(*leaves, n_img=n_img, backend=backend, **text)
        return out, torch.autograd.grad(out, leaves, dout)

    out, grads = run(txt_len=lengths)
    ref_out, ref_grads = reference(q, k, v, mask, n_img, dout)
    assert_close("out", out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r)
    out_m, grads_m = run(txt_mask=mask)
    if backend != "torch":
        assert torch.equal(out, out_m) and all(torch.equal(a, b) for a, b in zip(grads, grads_m))


def test_key_limits_under_torch_compile_and_the_flash_packing():
    B, n_img, S, H, D = 3, 9, 7, 2, 16
    q, k, v = make_qkv(B, n_img + S, H, D)
    lengths = _lengths(B, S)
    ref = A.joint_attention_ref(q, k, v, A.prefix_mask(lengths, S), n_img)
    compiled = torch.compile(lambda q, k, v, n: A.joint_attention(q, k, v, n_img=n_img, txt_len=n, backend="sdpa"),
                             fullgraph=True)
    assert_close("compiled sdpa", compiled(q, k, v, lengths), ref)
    flash = A._attn_flash(q, k, v, None, n_img, lengths, funcs=(dense_flash_ref, varlen_flash_ref))
    assert_close("flash packing", flash, ref)


def test_key_limit_runs_group_rows_and_cache_per_tensor():
    lengths = torch.tensor([5, 5, 0, 2, 2])
    plan = A._length_runs(lengths, 3)
    assert plan == [(0, 2, slice(0, 8)), (2, 3, slice(0, 3)), (3, 5, slice(0, 5))]
    assert A._length_runs(lengths, 3) is plan, "same tensor and version must hit the cache"
    lengths[2] = 5
    assert A._length_runs(lengths, 3)[0] == (0, 3, slice(0, 8))


def test_key_limits_are_checked():
    q = torch.randn(2, 7, 1, 16)
    with pytest.raises(ValueError, match="txt_mask and txt_len both given"):
        A.joint_attention(q, q, q, torch.ones(2, 3, dtype=torch.bool), n_img=4, txt_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"txt_len must be \[B=2\] integers"):
        A.joint_attention(q, q, q, n_img=4, txt_len=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"txt_len must be \[B=2\] integers"):
        A.joint_attention(q, q, q, n_img=4, txt_len=torch.tensor([1, 2, 3]))


KEY_LIMIT_AOT_SCRIPT = r"""
import json, torch
from lens_fast.kernels import flash_attention as fa
rows = []
for kind, table in fa.CONFIG_TABLES.items():
    c, use = fa.aot_compile(kind, 64, torch.bfloat16, 90, table[(90, 64)], has_mask=False, bounded=True)
    rows.append(dict(kind=kind, **use))
print(json.dumps(rows))
"""


def test_key_limit_kernels_compile_for_sm90_without_spills():
    """The key-limit variant (BOUNDED, no mask bytes) of every kernel, AOT for sm_90."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", KEY_LIMIT_AOT_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=170)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["kind"] for r in rows] == ["fwd", "dkdv", "dq"]
    assert all(r["spill_bytes"] == 0 and r["regs"] <= 255 for r in rows), rows


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("n_img,S,kind", [(1024, 77, "random"), (4032, 256, "prefix"), (960, 64, "empty")])
def test_gpu_bf16_within_twice_pytorch_error(backend, n_img, S, kind):
    check_half_precision(backend, torch.bfloat16, 2, n_img, S, 4, 64, kind)


@pytest.mark.cuda
@cuda
def test_gpu_auto_pick_and_fp8_error():
    from lens_fast.kernels import fp8_attention as f8
    q, k, v = make_qkv(2, 4096 + 256, 4, 64, dtype=torch.bfloat16)
    mask = make_mask(2, 256, "random")
    assert A.select_backend(q, k, v, mask) in ("flash_attn", "triton", "sdpa")
    if f8.fp8_supported(q.device):
        report = f8.fp8_attention_error(q, k, v, mask, n_img=4096)
        assert report["fp8_vs_fp32"] < 0.05, report
