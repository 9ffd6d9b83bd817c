"""Ahead-of-time compilation of Triton kernels for a GPU architecture, without a GPU.

Used by CI to catch what the interpreter cannot (layout limits, register spills) at the
configs and dtypes the launchers use at Lens shapes. Must run in a process where
TRITON_INTERPRET is not "1" (under the interpreter ``@triton.jit`` builds interpreted
functions, which cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, Mapping

import triton

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def compile_for(fn, arch: int, pointers: Mapping[str, str], constexprs: Mapping[str, object],
                floats=(), num_warps: int = 4, num_stages: int = 1):
    """Compile ``fn`` for sm_<arch>. ``pointers`` maps pointer argument names to Triton
    pointer types ("*bf16"); ``floats`` names float scalars; other arguments are i32.
    Pointers are marked 16-byte aligned, as PyTorch allocations are."""
    from triton.backends.compiler import GPUTarget
    arg_names = getattr(fn, "arg_names", None)
    if arg_names is None:
        raise RuntimeError(f"{fn!r} is not a compilable JITFunction (TRITON_INTERPRET="
                           f"{os.environ.get('TRITON_INTERPRET')!r}; expected it unset or 0)")
    unknown = set(pointers) | set(constexprs) | set(floats)
    unknown -= set(arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}; its arguments are {arg_names}")
    signature, attrs = {}, {}
    for i, name in enumerate(arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> Dict[str, int]:
    """Registers, spill (LOCAL) bytes and shared memory of a compiled kernel, read with the
    cuobjdump that ships inside the Triton wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cannot read registers/spills from cuobjdump output: {text!r}")
    return {"regs": int(found.group(1)), "spill_bytes": int(found.group(2)),
            "shared_bytes": int(compiled.metadata.shared)}
