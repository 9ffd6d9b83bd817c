"""FLOP counts of the Lens denoiser and the bf16 peaks of known cards (shared by the
trainer's MFU and the benchmarks).

Counted as matmul FLOPs, 2 per multiply-add. Per forward, with T = N + S tokens
(N image, S text), D = inner dim, F = int(D * 8 / 3) the SwiGLU width, H heads of d:

- per block, linear: both streams' fused QKV (3 D^2), output projection (D^2) and MLP
  (3 D F, or 8 D^2 for the non-gated MLP) on their own tokens, i.e. 2 T (4 D^2 + 3 D F),
  plus the two modulation linears 2 x (D x 6D) once per sample;
- per block, attention: Q K^T and P V over the joint sequence, 4 B H T^2 d;
- outside the blocks: img_in (C_in x D per image token), txt_in (K E x D per text token),
  the timestep MLP (256 x D + D x D), norm_out (D x 2D) and proj_out (D x p^2 C_out per
  image token).
A training step counts 3x the forward (backward = 2x forward); recomputation from
activation checkpointing is not counted (the MFU convention).
Norms, RoPE, softmax and element-wise ops are not counted.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, no sparsity), matched
# against torch.cuda.get_device_name() by substring, most specific first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def _get(config, key):
    if isinstance(config, Mapping):
        return config[key]
    return getattr(config, key)


def lens_forward_flops(config, n_img: int, n_txt: int, batch: int = 1) -> Dict[str, float]:
    """FLOPs of one denoiser forward: ``dict(linear=..., attention=..., total=...)``.

    ``config`` is a LensTransformer config (dict or attribute object with the official
    keys); ``n_img`` image tokens and ``n_txt`` text tokens per sample."""
    for name, v in (("n_img", n_img), ("n_txt", n_txt), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r}: expected a non-negative integer")
    heads, head_dim = int(_get(config, "num_attention_heads")), int(_get(config, "attention_head_dim"))
    dim = heads * head_dim
    layers = int(_get(config, "num_layers"))
    p, c_in = int(_get(config, "patch_size")), int(_get(config, "in_channels"))
    c_out = _get(config, "out_channels") or c_in
    enc = int(_get(config, "enc_hidden_dim"))
    k = len(_get(config, "selected_layer_index")) if _get(config, "multi_layer_encoder_feature") else 1
    tokens = n_img + n_txt
    if _get(config, "gate_mlp"):
        mlp = 3 * dim * int(dim / 3 * 8)
    else:
        mlp = 8 * dim * dim
    per_block_tokens = 2 * tokens * (4 * dim * dim + mlp)
    per_block_mod = 2 * 2 * dim * 6 * dim
    outside = (2 * n_img * c_in * dim + 2 * n_txt * k * enc * dim
               + 2 * (256 * dim + dim * dim) + 2 * dim * 2 * dim + 2 * n_img * dim * p * p * c_out)
    linear = batch * (layers * (per_block_tokens + per_block_mod) + outside)
    attention = batch * layers * 4 * heads * tokens * tokens * head_dim
    return dict(linear=float(linear), attention=float(attention), total=float(linear + attention))


def train_step_flops(config, n_img: int, n_txt: int, batch: int) -> float:
    """Model FLOPs of one training micro-step (forward + backward = 3 x forward)."""
    return 3.0 * lens_forward_flops(config, n_img, n_txt, batch)["total"]


def peak_bf16_tflops(device_name: Optional[str]) -> Optional[float]:
    """The card's dense bf16 peak, or None for an unknown card or a CPU."""
    if not device_name:
        return None
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(achieved_tflops: float, device_name: Optional[str]) -> Optional[float]:
    """Achieved TFLOP/s as a fraction of the card's bf16 peak (None when unknown)."""
    peak = peak_bf16_tflops(device_name)
    return None if peak is None else achieved_tflops / peak
