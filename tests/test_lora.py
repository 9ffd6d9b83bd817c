"""LoRA adapters (lens_fast.lora): the files of the ecosystem load (PEFT's own forward and
diffusers' own loader are the references), every path applies them (eager, fused w1|w3,
FP8, the engine, compiled with a hot-swap that does not recompile), fuse/unfuse is bit
exact, and a refused file changes nothing."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from lens_fast import LensPipeline, LensVAE
from lens_fast.engine import enable_fast_path
from lens_fast.errors import UserError
from lens_fast.lora import LoraFormatError, LoraMismatch, adapters, formats, is_adapted
from lens_fast.lora.formats import ModuleLora
from lens_fast.quant import LayerFilter, apply_quantization
from lens_fast.tiny import SCHEDULER, make_tiny_transformer, make_tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")
WIDE = dict(num_attention_heads=3, attention_head_dim=32)  # dim 96, SwiGLU 256: FP8-sized GEMMs


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 7, 40, generator=g) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return dict(hidden_states=torch.randn(2, 24, 128, generator=g), encoder_hidden_states=feats,
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.7]), img_shapes=[(1, 4, 6)])


@torch.no_grad()
def _run(model):
    return model(**_inputs()).sample


def _random_lora(model, select=lambda n: n.startswith("transformer_blocks"), rank=4, alpha=8.0, seed=5, std=0.1):
    g = torch.Generator().manual_seed(seed)
    return {n: ModuleLora(torch.randn(rank, t.in_features, generator=g) * std,
                          torch.randn(t.out_features, rank, generator=g) * std, alpha)
            for n, t in adapters.targets(model).items() if select(n)}


def _merged(model, *loras):
    """The reference: a copy of ``model`` with ``weight * alpha / r * B A`` added to the weights."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for modules, weight in loras:
            for name, m in modules.items():
                ref.get_submodule(name).weight += weight * m.scaling * (m.up @ m.down)
    return ref


def _state_dict(modules, prefix=""):
    """diffusers/PEFT keys (with ``prefix``) and an alpha per module."""
    out = {}
    for name, m in modules.items():
        out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = m.down, m.up
        out[f"{prefix}{name}.alpha"] = torch.tensor(m.alpha)
    return out


def _save(tmp_path, modules, name="lora"):
    folder = tmp_path / name
    formats.save_file(str(folder), modules)
    return str(folder)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- formats: PEFT, diffusers, kohya ------------------------------------------------------------

def test_a_lora_built_with_peft_loads_and_gives_peft_s_own_output(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    model = make_tiny_transformer(seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["img_qkv", "txt_qkv", "to_out.0", "to_add_out", "w1",
                                                                 "w2", "w3", "img_mod.1", "proj_out"],
                             rank_pattern={"w2": 2}, alpha_pattern={"img_qkv": 3})
    wrapped = peft.inject_adapter_in_model(config, copy.deepcopy(model))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = _run(wrapped)
    save_file(get_peft_model_state_dict(wrapped), str(tmp_path / "adapter_model.safetensors"))
    config.save_pretrained(str(tmp_path))                      # adapter_config.json: alphas and rank pattern
    adapters.load(model, str(tmp_path), "peft")
    assert (_run(model) - expected).abs().max() < 2e-6
    assert (_run(make_tiny_transformer(seed=1)) - expected).abs().max() > 0.1  # the adapter matters
    model.fuse_projections()                                   # w1, w3 now live inside w13
    assert (_run(model) - expected).abs().max() < 2e-6


def test_diffusers_own_loader_reads_what_lens_fast_writes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.loaders import PeftAdapterMixin

    class DiffusersLens(diffusers.ModelMixin, ConfigMixin, PeftAdapterMixin):
        """Lens's module tree behind diffusers' PeftAdapterMixin (what its LensTransformer2DModel has)."""

        def __init__(self, inner):
            super().__init__()
            for name, child in inner.named_children():
                self.add_module(name, child)

    model = make_tiny_transformer(seed=1)
    theirs = copy.deepcopy(model)
    modules = _random_lora(model, alpha=8.0)
    folder = _save(tmp_path, modules)
    DiffusersLens(theirs).load_lora_adapter(folder, weight_name=formats.LORA_WEIGHT_NAME, prefix="transformer")
    assert type(theirs.transformer_blocks[0].attn.img_qkv).__module__.startswith("peft")
    adapters.load(model, folder)
    expected = _run(theirs)
    assert (_run(model) - expected).abs().max() < 2e-6
    assert (_run(_merged(make_tiny_transformer(seed=1), (modules, 1.0))) - expected).abs().max() < 2e-6


def test_kohya_keys_map_onto_the_official_modules(tmp_path):
    model = make_tiny_transformer(seed=1)
    modules = _random_lora(model, rank=2, alpha=1.0)
    kohya = {}
    for name, m in modules.items():
        flat = "lora_unet_" + name.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = m.down, m.up
        kohya[f"{flat}.alpha"] = torch.tensor(1.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    adapters.load(model, str(tmp_path / "kohya.safetensors"))
    assert (_run(model) - _run(_merged(make_tiny_transformer(seed=1), (modules, 1.0)))).abs().max() < 2e-6
    kohya["lora_unet_transformer_blocks_7_attn_img_qkv.lora_down.weight"] = torch.zeros(2, 64)
    kohya["lora_unet_transformer_blocks_7_attn_img_qkv.lora_up.weight"] = torch.zeros(192, 2)
    save_file(kohya, str(tmp_path / "kohya2.safetensors"))
    with pytest.raises(LoraMismatch, match="lora_unet_transformer_blocks_7_attn_img_qkv"):
        adapters.load(model, str(tmp_path / "kohya2.safetensors"))


# -- every path ---------------------------------------------------------------------------------

def test_stacked_adapters_fused_layout_and_weights_match_merged_weights():
    model = make_tiny_transformer(seed=1)
    a = _random_lora(model, seed=5)
    b = _random_lora(model, select=lambda n: "_mlp.w" in n or n.endswith("img_mod.1"), rank=3, alpha=3.0, seed=6)
    adapters.load(model, _state_dict(a, "transformer."), "a")
    adapters.load(model, _state_dict(b), "b", weight=0.5)
    base = make_tiny_transformer(seed=1)
    both = _run(_merged(base, (a, 1.0), (b, 0.5)))
    assert (_run(model) - both).abs().max() < 2e-6
    model.fuse_projections()                                    # w1|w3 fused: B is block-diagonal in w13
    assert is_adapted(model.transformer_blocks[0].img_mlp.w13)
    assert (_run(model) - both).abs().max() < 2e-6
    adapters.set_adapters(model, ["a", "b"], [0.25, 2.0])
    assert (_run(model) - _run(_merged(base, (a, 0.25), (b, 2.0)))).abs().max() < 2e-6
    adapters.set_adapters(model, "b")
    assert adapters.active_adapters(model) == ["b"]
    assert (_run(model) - _run(_merged(base, (b, 1.0)))).abs().max() < 2e-6
    adapters.set_enabled(model, False)
    assert (_run(model) - _run(base)).abs().max() < 2e-6
    adapters.set_enabled(model, True)
    adapters.delete(model, "b")
    assert adapters.loaded_adapters(model) == ["a"] and adapters.active_adapters(model) == []
    adapters.unload(model)
    assert not any(is_adapted(m) for m in model.modules())
    assert _same(_snapshot(model), _snapshot(base.fuse_projections()))


def test_fuse_unfuse_restores_the_weights_bit_for_bit_across_a_layout_change():
    model = make_tiny_transformer(seed=1)
    original = _snapshot(model)
    lora = _random_lora(model)
    adapters.load(model, _state_dict(lora), "a", weight=0.7)
    unfused = _run(model)
    assert adapters.fuse(model) == ["a"]
    assert not any(is_adapted(m) for m in model.modules())     # fused: the base model's modules, its speed
    assert (_run(model) - unfused).abs().max() < 2e-6
    assert not _same(_snapshot(model), original)
    model.fuse_projections()                                    # the layout changes while fused
    assert adapters.unfuse(model) == ["a"]
    assert _same(_snapshot(model), original)                    # official keys, bit for bit
    assert (_run(model) - unfused).abs().max() < 2e-6          # back on the unfused path


def test_fp8_layers_add_the_delta_in_high_precision_and_fuse_exactly():
    model = make_tiny_transformer(seed=1, **WIDE)
    lora = _random_lora(model, std=0.3)  # an effect well above FP8's own error
    sd = _state_dict(lora)
    before = copy.deepcopy(model)
    adapters.load(before, sd, "a")                             # loaded, then quantised: follows the new layers
    apply_quantization(before, "fp8", backend="emulate", layer_filter=LayerFilter(exclude=[]))
    after = copy.deepcopy(model)
    result = apply_quantization(after, "fp8", backend="emulate", layer_filter=LayerFilter(exclude=[]))
    assert "transformer_blocks.0.img_mlp.w13" in result.quantized
    fp8_base = _run(after)
    adapters.load(after, sd, "a")                              # quantised, then loaded
    layer = after.transformer_blocks[0].img_mlp.w13
    assert type(layer).__name__ == "LoraFP8Linear" and layer.lora_down.dtype == torch.float32
    assert torch.equal(_run(before), _run(after))
    # One layer: the FP8 GEMM plus the LoRA term computed from the dequantised input.
    from lens_fast.quant.fp8 import quantize_rows
    x = torch.randn(5, 96)
    qx = quantize_rows(x)
    w1, w3 = lora["transformer_blocks.0.img_mlp.w1"], lora["transformer_blocks.0.img_mlp.w3"]
    delta = torch.cat([w1.scaling * (qx.dequantize() @ w1.down.T @ w1.up.T),
                       w3.scaling * (qx.dequantize() @ w3.down.T @ w3.up.T)], -1)
    plain = layer.lora_base_class.forward(layer, qx)
    assert (layer(qx) - plain - delta).abs().max() < 1e-5
    plain_model = make_tiny_transformer(seed=1, **WIDE)
    effect = _run(_merged(plain_model, (lora, 1.0))) - _run(plain_model)
    lora_fp8 = _run(after)
    assert ((lora_fp8 - fp8_base) - effect).norm() < 0.25 * effect.norm()  # the adapter's effect, within FP8 error
    buffers = {k: v.clone() for k, v in after.named_buffers() if "weight_" in k}
    adapters.fuse(after)
    assert ((_run(after) - fp8_base) - effect).norm() < 0.25 * effect.norm()  # fused into e4m3: the same effect
    adapters.unfuse(after)
    assert all(torch.equal(v, dict(after.named_buffers())[k]) for k, v in buffers.items())


def _pipe(seed=0):
    pipe = LensPipeline(scheduler=SCHEDULER, vae=LensVAE(make_tiny_vae(seed)), transformer=make_tiny_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=3):
    g = torch.Generator().manual_seed(9)
    feats = [torch.randn(1, 9, 40, generator=g) for _ in range(3)]
    latents = torch.randn(1, 24, 128, generator=g)
    return pipe(prompt_embeds=feats, prompt_mask=torch.ones(1, 9, dtype=torch.bool), height=64, width=96,
                num_inference_steps=steps, guidance_scale=4.0, latents=latents, output_type="latent").images


def test_the_fast_path_runs_the_adapters_and_follows_weights_and_swaps(tmp_path):
    eager, fast = _pipe(), _pipe()
    enable_fast_path(fast, compile=False)
    base = _sample(fast)
    everything = lambda n: not n.startswith("txt_norm")  # noqa: E731 - includes the modulation linears
    lora_a = _random_lora(eager.transformer, everything, seed=5, std=0.05)
    folder_a = _save(tmp_path, lora_a, "a")
    folder_b = _save(tmp_path, _random_lora(eager.transformer, everything, seed=7, std=0.05), "b")
    for pipe in (eager, fast):
        pipe.load_lora_weights(folder_a, adapter_name="style", scale=0.8)
    with_lora = _sample(fast)
    merged = _pipe()  # the expected delta: W + 0.8 * alpha / r * B A in the weights, run eagerly
    merged.transformer = _merged(merged.transformer, (lora_a, 0.8))
    assert (with_lora - _sample(merged)).abs().max() < 1e-4
    assert (with_lora - _sample(eager)).abs().max() < 1e-4
    assert (with_lora - base).abs().max() > 1e-2
    for pipe in (eager, fast):
        pipe.load_lora_weights(folder_b, adapter_name="style", hotswap=True, scale=0.5)
    assert (_sample(fast) - _sample(eager)).abs().max() < 1e-4
    fast.set_adapters("style", 0.0)
    assert (_sample(fast) - base).abs().max() < 1e-4
    fast.set_adapters("style", 1.0)
    fast.fuse_lora()
    fused = _sample(fast)
    eager.set_adapters("style", 1.0)
    assert (fused - _sample(eager)).abs().max() < 1e-4
    fast.unfuse_lora()
    fast.unload_lora_weights()
    assert (_sample(fast) - base).abs().max() < 1e-5


def test_hot_swap_under_the_compiled_engine_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    eager, fast = _pipe(), _pipe()
    select = lambda n: ".attn." in n or "_mlp." in n  # noqa: E731
    fast.enable_lora_hotswap(target_rank=6)
    fast.load_lora_weights(_save(tmp_path, _random_lora(fast.transformer, select, rank=4, seed=5), "a"), "s")
    enable_fast_path(fast, compile=True)
    _sample(fast, steps=2)
    graphs = counters["stats"]["unique_graphs"]
    swapped = _save(tmp_path, _random_lora(fast.transformer, select, rank=6, alpha=3.0, seed=8), "b")
    fast.load_lora_weights(swapped, "s", hotswap=True)
    fast.set_adapters("s", 0.6)
    out = _sample(fast, steps=2)
    assert counters["stats"]["unique_graphs"] == graphs      # no recompilation
    eager.load_lora_weights(swapped, "s", scale=0.6)
    assert (out - _sample(eager, steps=2)).abs().max() < 1e-4
    with pytest.raises(LoraMismatch, match="rank 7 .* more than the 6 reserved"):
        fast.load_lora_weights(_save(tmp_path, _random_lora(fast.transformer, select, rank=7), "c"), "s",
                               hotswap=True)


# -- bad input ----------------------------------------------------------------------------------

def _bad_files(tmp_path, model):
    lora = _random_lora(model)
    good = {k: v for k, v in _state_dict(lora, "transformer.").items() if not k.endswith("alpha")}
    first = "transformer.transformer_blocks.0.attn.img_qkv"
    cases = {
        "other_model.safetensors": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 320),
                                     "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(320, 4)},
                                    LoraMismatch, "for another model"),
        "shape.safetensors": (good | {f"{first}.lora_A.weight": torch.zeros(4, 65)}, LoraMismatch,
                              r"img_qkv has A \(4, 65\)"),
        "rank.safetensors": (good | {f"{first}.lora_B.weight": torch.zeros(192, 3)}, LoraMismatch, "one rank r"),
        "unknown_keys.safetensors": (good | {"transformer.transformer_blocks.0.attn.img_qkv.hada_w1_a":
                                             torch.zeros(2, 2)}, LoraFormatError, "hada_w1_a"),
        "extra_module.safetensors": (good | {"transformer.transformer_blocks.9.attn.img_qkv.lora_A.weight":
                                             torch.zeros(4, 64),
                                             "transformer.transformer_blocks.9.attn.img_qkv.lora_B.weight":
                                             torch.zeros(192, 4)}, LoraMismatch, "transformer_blocks.9"),
        "half_pair.safetensors": ({k: v for k, v in good.items() if k != f"{first}.lora_B.weight"},
                                  LoraFormatError, "img_qkv has no up"),
        "text_encoder.safetensors": (good | {"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)},
                                     LoraMismatch, "text encoder"),
        "nan.safetensors": (good | {f"{first}.lora_A.weight": torch.full((4, 64), float("nan"))}, LoraMismatch,
                            "NaN"),
    }
    for name, (tensors, _, _) in cases.items():
        save_file(tensors, str(tmp_path / name))
    torch.save(good, str(tmp_path / "pickle.bin"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases["pickle.bin"] = (None, UserError, "pickle file; lens_fast reads safetensors only")
    cases["corrupt.safetensors"] = (None, LoraFormatError, "not a readable safetensors file")
    return good, cases


def test_a_refused_file_says_why_in_one_line_and_changes_nothing(tmp_path):
    pipe = _pipe()
    enable_fast_path(pipe, compile=False)
    good, cases = _bad_files(tmp_path, pipe.transformer)
    pipe.load_lora_weights(good, adapter_name="ok", scale=0.5)
    weights, out = _snapshot(pipe.transformer), _sample(pipe)
    buffers = {k: v.clone() for k, v in pipe.transformer.named_buffers()}
    for name, (_, error, message) in cases.items():
        with pytest.raises(error, match=message) as info:
            pipe.load_lora_weights(str(tmp_path / name), adapter_name="new")
        assert isinstance(info.value, UserError) and "\n" not in str(info.value), name
        assert pipe.get_list_adapters() == {"transformer": ["ok"]}, name
    assert _same(_snapshot(pipe.transformer), weights)
    assert _same({k: v for k, v in pipe.transformer.named_buffers()}, buffers)
    assert torch.equal(_sample(pipe), out)
    with pytest.raises(LoraMismatch, match="adapts modules the loaded adapter does not"):
        pipe.load_lora_weights(good | {"transformer.proj_out.lora_A.weight": torch.zeros(4, 64),
                                       "transformer.proj_out.lora_B.weight": torch.zeros(128, 4)}, "ok", hotswap=True)
    with pytest.raises(UserError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="ok")
    with pytest.raises(UserError, match=r"not loaded; loaded: \['ok'\]"):
        pipe.set_adapters(["ok", "missing"])
    assert torch.equal(_sample(pipe), out)


def test_a_folder_is_read_by_diffusers_names_and_pickles_are_refused(tmp_path):
    model = make_tiny_transformer(seed=1)
    folder = _save(tmp_path, _random_lora(model))
    assert formats.resolve_file(folder).endswith(formats.LORA_WEIGHT_NAME)
    only_pickle = tmp_path / "old"
    only_pickle.mkdir()
    torch.save({}, str(only_pickle / "pytorch_lora_weights.bin"))
    with pytest.raises(UserError, match="holds only pickle files"):
        adapters.load(model, str(only_pickle))
    with pytest.raises(UserError, match="does not exist"):
        adapters.load(model, str(tmp_path / "missing.safetensors"))
    assert not any(is_adapted(m) for m in model.modules())
