"""The ``lens-fast`` command: ``generate``, ``train``, ``demo`` and ``rl-prompts``.

Errors a user can cause (bad values, missing or corrupt files, outputs that cannot be
written) are found before any model loads, print one line to stderr and exit with
status 2; anything else is a bug and prints a traceback (``lens_fast.errors.run_cli``).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional, Tuple

from .cli_checks import (OneLineParser, check_device, check_input_file, check_output_file, integer, number,
                         quiet_loaders)
from .errors import CorruptFile, InvalidValue, MissingFile, run_cli
from .reasoner.generate_cli import ReasoningSetup, generation_record
from .reasoner.generate_cli import add_arguments as add_reasoner_arguments

# Subcommands with their own parser: name -> (module whose ``main(argv)`` runs it, help line).
SUBCOMMANDS = {
    "train": ("lens_fast.train.cli", "train or fine-tune Lens (see lens_fast.train)"),
    "demo": ("lens_fast.toy.demo_cli", "train and score a miniature Lens on this CPU"),
    "search-system-prompt": ("lens_fast.reasoner.search_cli", "tune the reasoner's system prompt (training-free)"),
    "curate": ("lens_fast.curate.cli", "filter, deduplicate and caption images into training shards"),
    "rl-prompts": ("lens_fast.rl.prompts", "build a taxonomy-driven RL prompt set with rubrics; report its coverage"),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
SIZE_MULTIPLE = 16  # Lens: the VAE's 8x times the 2x2 patch
ASPECT_RATIOS = ["1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1"]


def _read_prompts(args) -> List[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        check_input_file(args.prompt_file, "--prompt-file")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise CorruptFile(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    if not prompts:
        raise InvalidValue("no prompt given: use --prompt TEXT (repeatable) or --prompt-file FILE")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise InvalidValue(f"--prompt number {empty[0] + 1} is empty; expected some text")
    return prompts


def _output_paths(out: str, n: int, overwrite: bool) -> List[str]:
    root, ext = os.path.splitext(out)
    if ext.lower() not in IMAGE_EXTS:
        raise InvalidValue(f"--out {out!r} must name an image file ({', '.join(IMAGE_EXTS)})")
    paths = [out] if n == 1 else [f"{root}_{i:03d}{ext}" for i in range(n)]
    for path in paths:
        check_output_file(path, "--out", overwrite)
    return paths


def check_generate_args(args) -> Tuple[List[str], List[str]]:
    """Every check of ``generate``'s inputs and outputs; returns (prompts, output paths)."""
    if (args.height is None) != (args.width is None):
        raise InvalidValue("--height and --width must be given together")
    if args.height is not None and (args.base_resolution is not None or args.aspect_ratio is not None):
        raise InvalidValue("use either --height/--width or --base-resolution/--aspect-ratio, not both")
    if (args.base_resolution is None) != (args.aspect_ratio is None):
        raise InvalidValue("--base-resolution and --aspect-ratio must be given together")
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and v % SIZE_MULTIPLE:
            raise InvalidValue(f"{flag} {v}: expected a multiple of {SIZE_MULTIPLE} (Lens's VAE and patch size)")
    if args.template_date is not None:
        from .text_encoder import validate_template_date

        validate_template_date(args.template_date, source="--template-date")
    check_device("--device", args.device)
    if not os.path.isdir(args.model):
        raise MissingFile(f"--model {args.model} does not exist; expected a Lens checkpoint folder")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise MissingFile(f"--model {args.model} is not a Lens checkpoint folder: model_index.json is missing")
    prompts = _read_prompts(args)
    return prompts, _output_paths(args.out, len(prompts), args.overwrite)


def cmd_generate(args) -> int:
    reasoning = ReasoningSetup(args)  # checks the system prompt and the endpoint before any compute
    prompts, paths = check_generate_args(args)
    if args.quiet:
        quiet_loaders()
    import torch

    from .image_metadata import save_image
    from .pipeline import LensPipeline

    pipe = LensPipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device,
                                        template_date=args.template_date, quantization=args.quantization,
                                        lens_defaults=True)  # the CLI: the variant's recommended steps/guidance
    reasoning.attach(pipe)
    if args.fast:
        pipe.enable_fast_path()
    pipe.set_progress_bar_config(disable=args.quiet)
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        out = pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   base_resolution=args.base_resolution, aspect_ratio=args.aspect_ratio,
                   num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                   max_sequence_length=args.max_sequence_length, reason=args.reason is not None)
        image = out.images[0]
        save_image(image, path, generation_record(args, pipe, prompt, out, args.seed + i, image))
        print(path)
    return 0


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="lens-fast", description="Run, train and try Lens fast.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image with a Lens checkpoint folder")
    g.add_argument("--model", required=True, help="checkpoint folder (diffusers layout)")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several images)")
    g.add_argument("--prompt-file", help="a file with one prompt per line")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--height", type=integer(SIZE_MULTIPLE, 8192), help=f"pixels, a multiple of {SIZE_MULTIPLE}")
    g.add_argument("--width", type=integer(SIZE_MULTIPLE, 8192), help=f"pixels, a multiple of {SIZE_MULTIPLE}")
    g.add_argument("--base-resolution", type=int, choices=[1024, 1440])
    g.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, help="W:H bucket (with --base-resolution)")
    g.add_argument("--steps", type=integer(1, 1000), help="default: the variant's recommended value")
    g.add_argument("--guidance", type=number(0, 100), help="CFG scale (1: no CFG); default: the variant's "
                                                           "recommended value")
    g.add_argument("--seed", type=integer(0, 2 ** 63 - 1), default=0, help="seed of the first image (+1 per "
                                                                            "further prompt)")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.add_argument("--max-sequence-length", type=integer(1, 8192), default=512)
    g.add_argument("--template-date", help="YYYY-MM-DD fixed into the chat template (reproducible encodings)")
    g.add_argument("--quantization", choices=["fp8"], help="opt-in FP8 linear layers (Hopper; emulated on CPU)")
    g.add_argument("--fast", action="store_true", help="use the inference engine (compile, CUDA graphs)")
    g.add_argument("--out", required=True, help="output image; several prompts give numbered files")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reasoner_arguments(g)
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


def run(argv: List[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def passive_openmp() -> None:
    """Re-run this command with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    With the default policy libgomp's threads spin between parallel regions; when another
    CPU-heavy process shares the cores, the demo's small ops ran 4-13x slower on a 2-core
    machine (README, "Reliability"). The variable is read when libgomp loads, which is
    before this function can run (``import lens_fast`` imports torch), hence the exec.
    Only the ``lens-fast`` command does this; the results do not change, only the speed."""
    if "OMP_WAIT_POLICY" in os.environ or not sys.executable:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "lens_fast.cli", *sys.argv[1:]])


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lens-fast``: returns the exit status (2 for user errors, 1 for bugs)."""
    if argv is None:
        passive_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli("lens-fast", run, argv)


if __name__ == "__main__":
    sys.exit(main())
