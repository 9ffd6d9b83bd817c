"""The ``lens-fast`` command: ``generate``, ``train``, ``demo`` and ``rl-prompts``.

Errors a user can cause (bad sizes, missing folders, corrupt files, unknown options)
print one line to stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError)


# Subcommands with their own parser: name -> (module whose ``main(argv)`` runs it, help line).
SUBCOMMANDS = {
    "train": ("lens_fast.train.cli", "train or fine-tune Lens (see lens_fast.train)"),
    "demo": ("lens_fast.toy.demo", "train and score a miniature Lens on this CPU"),
    "rl-prompts": ("lens_fast.rl.prompts", "build a taxonomy-driven RL prompt set with rubrics; report its coverage"),
}


def _read_prompts(args) -> List[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"prompt file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _output_paths(out: str, n: int, overwrite: bool) -> List[str]:
    root, ext = os.path.splitext(out)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {out!r} must name an image file (.png, .jpg, .webp)")
    paths = [out] if n == 1 else [f"{root}_{i:03d}{ext}" for i in range(n)]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it")
    return paths


def cmd_generate(args) -> int:
    import torch

    from .pipeline import LensPipeline

    prompts = _read_prompts(args)
    if (args.height is None) != (args.width is None):
        raise ValueError("--height and --width must be given together")
    if args.height is not None and (args.base_resolution is not None or args.aspect_ratio is not None):
        raise ValueError("use either --height/--width or --base-resolution/--aspect-ratio, not both")
    paths = _output_paths(args.out, len(prompts), args.overwrite)
    pipe = LensPipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device,
                                        template_date=args.template_date, quantization=args.quantization)
    if args.fast:
        pipe.enable_fast_path()
    pipe.set_progress_bar_config(disable=args.quiet)
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        image = pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                     base_resolution=args.base_resolution, aspect_ratio=args.aspect_ratio,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                     max_sequence_length=args.max_sequence_length).images[0]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens-fast", description="Run, train and try Lens fast.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image with a Lens checkpoint folder")
    g.add_argument("--model", required=True, help="checkpoint folder (diffusers layout)")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several images)")
    g.add_argument("--prompt-file", help="a file with one prompt per line")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--base-resolution", type=int, choices=[1024, 1440])
    g.add_argument("--aspect-ratio", help="one of 1:2 9:16 2:3 3:4 1:1 4:3 3:2 16:9 2:1")
    g.add_argument("--steps", type=int, help="default: the variant's recommended value")
    g.add_argument("--guidance", type=float, help="default: the variant's recommended value")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.add_argument("--max-sequence-length", type=int, default=512)
    g.add_argument("--template-date", help="YYYY-MM-DD fixed into the chat template (reproducible encodings)")
    g.add_argument("--quantization", choices=["fp8"], help="opt-in FP8 linear layers (Hopper; emulated on CPU)")
    g.add_argument("--fast", action="store_true", help="use the inference engine (compile, CUDA graphs)")
    g.add_argument("--out", required=True, help="output image; several prompts give numbered files")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False).set_defaults(func=None)
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lens-fast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
