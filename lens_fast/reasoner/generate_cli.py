"""The reasoner's part of ``lens-fast generate``: its options, the checks that run before
any model is loaded, and the record written into each image.

Bad input stops the command in one line (exit 2) before any compute: a system-prompt
file that is missing or empty, ``--reason api`` without ``LENS_FAST_REASONER_BASE_URL`` /
``_MODEL``, an endpoint that cannot be reached or refuses the key.
"""
from __future__ import annotations

from typing import Optional

from ..errors import InvalidValue
from .base import Reasoner, load_system_prompt
from .integration import BACKENDS


def add_arguments(parser) -> None:
    parser.add_argument("--reason", choices=BACKENDS,
                        help="rewrite each prompt with an LLM first: 'local' (the checkpoint's GPT-OSS) or 'api' "
                             "(the endpoint in LENS_FAST_REASONER_BASE_URL / _MODEL / _API_KEY)")
    parser.add_argument("--system-prompt", help="the reasoner's system prompt file (default: the packaged Lens one)")
    parser.add_argument("--reason-cache", help="folder caching rewrites across runs (default: in memory only)")
    parser.add_argument("--reason-max-tokens", type=int,
                        help="most tokens the reasoner may generate, analysis included (default: local 768, api 1024)")


class ReasoningSetup:
    """Made from the parsed arguments before the model loads (all checks happen here);
    ``attach(pipe)`` gives the loaded pipeline its reasoner."""

    def __init__(self, args):
        self.backend_name: Optional[str] = args.reason
        self.cache_dir = args.reason_cache
        if args.reason_max_tokens is not None and args.reason_max_tokens < 1:
            raise InvalidValue(f"--reason-max-tokens {args.reason_max_tokens}: expected a positive number of tokens")
        self.limit = {} if args.reason_max_tokens is None else {"max_tokens": args.reason_max_tokens}
        if args.system_prompt is not None and args.reason is None:
            raise InvalidValue("--system-prompt is used only with --reason local|api")
        self.system_prompt = load_system_prompt(args.system_prompt) if args.reason else None
        self.backend = None
        if args.reason == "api":
            from ..chat_api import ChatError
            from .api import ApiBackend

            try:
                self.backend = ApiBackend.from_env(**self.limit)
                self.backend.check()
            except ChatError as e:
                raise InvalidValue(str(e)) from None

    def attach(self, pipe) -> None:
        if self.backend_name is None:
            return
        if self.backend is None:
            from .integration import build_reasoner

            limit = {"max_new_tokens": self.limit["max_tokens"]} if self.limit else {}
            pipe.reasoner = build_reasoner("local", pipe.prompt_encoder, system_prompt=self.system_prompt,
                                           cache_dir=self.cache_dir, **limit)
        else:
            pipe.reasoner = Reasoner(self.backend, self.system_prompt, cache_dir=self.cache_dir)


def generation_record(args, pipe, prompt: str, output, seed: int, image) -> dict:
    """What goes into the image file: the request, what was encoded, the seed and every
    setting needed to generate it again."""
    steps, guidance = pipe.recommended
    rewrite = output.rewrites[0] if output.rewrites else None
    settings = {"model": args.model, "variant": pipe.variant,
                "steps": steps if args.steps is None else args.steps,
                "guidance": guidance if args.guidance is None else args.guidance,
                "width": image.size[0], "height": image.size[1], "dtype": args.dtype,
                "max_sequence_length": args.max_sequence_length, "template_date": args.template_date,
                "quantization": args.quantization}
    if rewrite is not None:
        settings["reasoner"] = pipe.reasoner.describe()
    return {"prompt": prompt, "negative_prompt": args.negative_prompt or None, "seed": seed,
            "rewritten_prompt": rewrite.prompt if rewrite is not None and rewrite.rewritten else None,
            "reasoner_note": rewrite.reason if rewrite is not None else None,  # why it fell back, or was cut
            "settings": settings, "software": "lens_fast"}
