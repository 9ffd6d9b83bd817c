"""lens_fast.flops: the published Lens forward costs and a hand count of a small config."""
import pytest
import torch

from lens_fast.flops import lens_forward_flops, mfu, peak_bf16_tflops, train_step_flops
from lens_fast.models.config import LensTransformerConfig
from lens_fast.tiny import TINY_TRANSFORMER

OFFICIAL = LensTransformerConfig.defaults


@pytest.mark.parametrize("n_img,n_txt,total,linear,attention", [
    (4096, 256, 17.43, 11.84, 5.59),  # 1024^2
    (8100, 256, 43.3, None, None),  # 1440^2
    (1024, 200, 3.78, None, None),  # 512^2
])
def test_official_forward_matches_the_gpu_checks_numbers(n_img, n_txt, total, linear, attention):
    f = lens_forward_flops(OFFICIAL, n_img, n_txt)
    digits = 2 if total < 40 else 1
    assert round(f["total"] / 1e12, digits) == total
    if linear is not None:
        assert round(f["linear"] / 1e12, 2) == linear
        assert round(f["attention"] / 1e12, 2) == attention
    assert f["total"] == f["linear"] + f["attention"]


def test_hand_count_of_a_small_config_and_batch_linearity():
    cfg = dict(OFFICIAL, num_layers=2, num_attention_heads=2, attention_head_dim=8, inner_dim=16,
               enc_hidden_dim=10, in_channels=12, out_channels=3, patch_size=2, selected_layer_index=[0, 1, 2])
    n, s, d, f_, layers, heads, hd = 6, 4, 16, int(16 / 3 * 8), 2, 2, 8
    t = n + s
    # Per block: both streams' QKV (3 d^2) + out (d^2) + SwiGLU (3 d f) per token; two
    # modulation linears d -> 6d per sample.
    block = 2 * t * (3 * d * d + d * d + 3 * d * f_) + 2 * (2 * d * 6 * d)
    outside = 2 * n * 12 * d + 2 * s * (3 * 10) * d + 2 * (256 * d + d * d) + 2 * d * 2 * d + 2 * n * d * 12
    attn = 4 * heads * t * t * hd
    got = lens_forward_flops(cfg, n, s)
    assert got["linear"] == layers * block + outside
    assert got["attention"] == layers * attn
    got3 = lens_forward_flops(cfg, n, s, batch=3)
    assert got3["total"] == 3 * got["total"]
    assert train_step_flops(cfg, n, s, 3) == 3 * got3["total"]


def test_counts_match_the_model_parameters_it_multiplies():
    """Every weight matrix of the tiny model is counted once per token of its stream:
    the linear count at batch 1 equals 2 x (per-token weights) for an all-image model
    apart from the per-sample modulation / timestep terms (checked by construction)."""
    from lens_fast.models.transformer import LensTransformer2DModel

    model = LensTransformer2DModel(**TINY_TRANSFORMER)
    n, s = 16, 5
    macs = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if "_mod." in name or name.startswith(("time_text_embed", "norm_out")):
                rows = 1  # modulation, timestep MLP, output-head modulation: once per sample
            elif name.startswith("txt_in") or ".txt_" in name or name.endswith("to_add_out"):
                rows = s
            elif name.startswith(("img_in", "proj_out")) or ".img_" in name or name.endswith("to_out.0"):
                rows = n
            else:
                raise AssertionError(f"unclassified linear {name}")
            macs += rows * mod.in_features * mod.out_features
    assert lens_forward_flops(TINY_TRANSFORMER, n, s)["linear"] == 2 * macs


def test_bad_arguments_and_peak_table():
    with pytest.raises(ValueError, match="n_img=-1"):
        lens_forward_flops(OFFICIAL, -1, 4)
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("cpu") is None and mfu(1.0, "cpu") is None
    assert mfu(494.5, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
