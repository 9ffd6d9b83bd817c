"""Post-training with RL: taxonomy-driven prompt sets (``prompts``), rewards behind one
interface (``rewards``: ShapeEval for the toy world, the rubric judge over an
OpenAI-compatible VLM endpoint in ``judge``). The recipe itself is ``lens_fast.train.rl``
(DiffusionNFT on the trainer's one loop)."""
from .prompts import (KIND_TAGS, PromptSetError, build_prompt_set, coverage, load_prompt_set, load_taxonomy,
                      write_prompt_set)

__all__ = ["KIND_TAGS", "PromptSetError", "build_prompt_set", "coverage", "load_prompt_set", "load_taxonomy",
           "write_prompt_set"]
