"""LoRA adapters for the Lens transformer, in the formats the ecosystem uses.

    pipe.load_lora_weights("style.safetensors", adapter_name="style", scale=0.8)
    pipe.load_lora_weights("folder_with_pytorch_lora_weights/", adapter_name="subject")
    pipe.set_adapters(["style", "subject"], adapter_weights=[0.8, 1.0])
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()
    pipe.enable_lora_hotswap(target_rank=32)          # before the first load
    pipe.load_lora_weights("other.safetensors", adapter_name="style", hotswap=True)

``formats``: reading (diffusers/PEFT and kohya keys, safetensors only), checking against a
model, writing diffusers' layout. ``layer``: the adapted linear (stacked adapters, one
implementation for plain, fused and FP8 layers). ``adapters``: the per-model state and its
operations. ``pipeline``: ``LoraLoaderMixin``, diffusers' method names on ``LensPipeline``.
``trainable``: adapters as parameters for the trainer's ``lora`` recipe.

Why not PEFT's layers: PEFT wraps each targeted ``nn.Linear`` (renaming its weights to
``base_layer``), so it cannot put a LoRA of ``w1`` or ``w3`` inside the fused ``w13`` GEMM,
does not accept the FP8 layers' quantised activations, and would change the official
state-dict names every checkpoint path here relies on. PEFT is the reference the tests
hold this implementation to (same outputs as PEFT's forward on the same adapter, and
diffusers' own loader reads what the trainer writes).
"""
from .adapters import LoraState, active_adapters, loaded_adapters, state_of, targets
from .formats import (LORA_WEIGHT_NAME, LoraFormatError, LoraMismatch, ModuleLora, lora_state_dict, read_file,
                      save_file)
from .layer import is_adapted
from .pipeline import LoraLoaderMixin

__all__ = ["LORA_WEIGHT_NAME", "LoraFormatError", "LoraLoaderMixin", "LoraMismatch", "LoraState", "ModuleLora",
           "active_adapters", "is_adapted", "loaded_adapters", "lora_state_dict", "read_file", "save_file",
           "state_of", "targets"]
