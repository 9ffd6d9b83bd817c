"""The reasoner: an LLM turns a short or vague request into the detailed prompt Lens reads.

    from lens_fast import LensPipeline
    pipe = LensPipeline.from_pretrained("path/to/Lens", reasoner="local")   # or "api"
    out = pipe("a fox in the snow", reason=True)
    out.prompts[0], out.rewrites[0].rewritten                               # what was encoded

Backends (one interface, ``base.ChatBackend``): ``local.LocalGptOssBackend`` (the GPT-OSS
weights the text encoder holds), ``api.ApiBackend`` (any OpenAI-compatible endpoint),
``base.CallableBackend`` (your function). ``base.Reasoner`` adds checks, fallback and the
cache; ``integration.rewrite_for_encoder`` fits the rewrites to the encoder. The training-free
system-prompt search is ``search`` (``lens-fast search-system-prompt``; SEARCH.md).
"""
from .base import (DEFAULT_SYSTEM_PROMPT_FILE, CallableBackend, ChatBackend, Reasoner, Rewrite, RewriteError,
                   load_system_prompt, system_prompt_id)
from .checks import language_of, rejection_reason
from .integration import BACKENDS, build_reasoner, fit_to_encoder, rewrite_for_encoder

__all__ = ["BACKENDS", "DEFAULT_SYSTEM_PROMPT_FILE", "CallableBackend", "ChatBackend", "Reasoner", "Rewrite",
           "RewriteError", "build_reasoner", "fit_to_encoder", "language_of", "load_system_prompt",
           "rejection_reason", "rewrite_for_encoder", "system_prompt_id"]
