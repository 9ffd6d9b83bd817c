"""GPU binaries and the GPU check, prepared on a machine without a GPU.

- Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a (``--resource-usage``), with no
  register spills; csrc/bindings.cpp compiles (syntax) against the installed torch headers.
- Every fused-op Triton kernel compiles ahead of time for sm_90 and sm_80 at the launch
  configs the launchers use at Lens shapes (dim 1536, txt_in 2880, 24 heads x 64, SwiGLU
  hidden 4096), in bf16 (and fp32 for the forward paths), with no spills (cuobjdump).
- bench/gpu_check.sh rehearses its whole flow (GPU_CHECK_DRY_RUN=1: ceilings and
  bench/ops.py --dry-run, results folder, summary), and bench/ops.py's dry run reports
  every op forward and backward for the reference, compile and its block section.
Skipped visibly where the compiler is absent. Registers found are printed (-s shows them).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
NVCC = shutil.which("nvcc")


def test_csrc_has_the_fused_forward_kernels():
    assert {"qk_norm_rope.cu", "norm_modulate.cu"} <= set(CU_FILES)
    assert os.path.isfile(os.path.join(CSRC, "bindings.cpp"))


def _ptxas_report(text: str):
    """[(kernel, arch, registers, spill store bytes, spill load bytes)] from ptxas -v output."""
    rows = []
    for m in re.finditer(r"Compiling entry function '(\w+)' for '(sm_\w+)'.*?"
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", text, re.S):
        rows.append((m.group(1), m.group(2), int(m.group(5)), int(m.group(3)), int(m.group(4))))
    return rows


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: CUDA sources not compiled")
@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_source_compiles_without_spills(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", "--resource-usage",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           os.path.join(CSRC, source), "-o", str(tmp_path / (source + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
    report = _ptxas_report(proc.stdout + proc.stderr)
    archs = {arch for _, arch, *_ in report}
    assert archs == {"sm_80", "sm_90a"}, f"expected kernels for sm_80 and sm_90a, got {archs}"
    for kernel, arch, regs, st, ld in report:
        print(f"{source} {arch} regs={regs} spill_st={st} spill_ld={ld} {kernel[-60:]}")
        assert st == 0 and ld == 0, f"{kernel} spills on {arch}: {st} B stored, {ld} B loaded"


def _torch_include_dirs():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    return include_paths()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: bindings.cpp not checked")
def test_bindings_compile_against_torch_headers():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"), "/usr/local/cuda/include"]
    if NVCC:
        candidates.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"))
    found = [d for d in candidates if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))]
    if not found:
        pytest.skip(f"CUDA headers (cuda_runtime_api.h) not found in {candidates}")
    cuda_include = found[0]
    includes = _torch_include_dirs()
    if not includes:
        pytest.skip("torch C++ headers not found")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", f"-I{cuda_include}",
           f"-I{sysconfig.get_paths()['include']}"] + [f"-I{d}" for d in includes]
    cmd.append(os.path.join(CSRC, "bindings.cpp"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, "bindings.cpp does not compile:\n" + "\n".join(errors[:30])


# ----------------------------------------------------------------------------- Triton AOT

_AOT_SCRIPT = r"""
import json, sys
import torch
from lens_fast.kernels import aot, norm_modulate as NK, qk_norm_rope as QK, swiglu as SK
from lens_fast.ops import norm_modulate as nm
archs = [int(a) for a in sys.argv[1].split(",")]
T = {torch.bfloat16: "bf16", torch.float32: "fp32"}
cases = []
for dtype in (torch.bfloat16, torch.float32):
    e = "*" + T[dtype]
    p = {n: e for n in ("IMG", "TXT", "W_Q", "W_K", "W_AQ", "W_AK", "Q", "K", "V")}
    p.update(ROPE="*fp32")
    cases.append(("qk_fwd", QK.qk_norm_rope_fwd_kernel, p, dict(BLOCK_T=QK.block_t(False), BLOCK_D=64),
                  ["eps"], QK.NUM_WARPS, dtype))
    # Forward variants at dim 1536 (the block) and 2880 (txt_norm).
    for c, flags in ((1536, (0, 1, 1, 0)), (1536, (1, 1, 1, 0)), (1536, (0, 0, 1, 1)), (2880, (0, 1, 0, 0))):
        block_c, rows, warps = nm.fwd_config(c, False)
        p = {n: e for n in ("X", "Y", "GATE", "W", "SHIFT", "SCALE", "RES_OUT", "OUT")}
        p.update(MEAN="*fp32", RSTD="*fp32")
        k = dict(BLOCK_C=block_c, ROWS=rows, HAS_RESIDUAL=bool(flags[0]), HAS_WEIGHT=bool(flags[1]),
                 HAS_MOD=bool(flags[2]), LAYER=bool(flags[3]))
        cases.append((f"norm_fwd_c{c}_{''.join(map(str, flags))}", NK.norm_modulate_fwd_kernel, p, k, ["eps"],
                      warps, dtype))
    rows, block_f, warps = SK.config(4096, False)
    cases.append(("silu_mul_fwd", SK.silu_mul_fwd_kernel, {n: e for n in ("A", "B", "OUT")},
                  dict(ROWS=rows, BLOCK_F=block_f), [], warps, dtype))
e = "*bf16"
p = {n: e for n in ("DQ", "DK", "DV", "IMG", "TXT", "W_Q", "W_K", "W_AQ", "W_AK", "DIMG", "DTXT")}
p.update(ROPE="*fp32", DW_PART="*fp32")
cases.append(("qk_bwd", QK.qk_norm_rope_bwd_kernel, p, dict(BLOCK_T=QK.block_t(False, True), BLOCK_D=64), ["eps"],
              QK.NUM_WARPS, torch.bfloat16))
for c, flags in ((1536, (1, 1, 1, 1, 0)), (1536, (0, 0, 1, 1, 0)), (1536, (0, 0, 0, 1, 1)), (2880, (0, 0, 1, 0, 0))):
    block_c, rows, warps = nm.bwd_config(c, False)
    p = {n: e for n in ("DOUT", "DRES", "XN", "Y", "GATE", "W", "SCALE", "DX", "DY")}
    p.update({n: "*fp32" for n in ("MEAN", "RSTD", "DW_PART", "DSHIFT_PART", "DSCALE_PART", "DGATE_PART")})
    k = dict(BLOCK_C=block_c, ROWS=rows, HAS_DRES=bool(flags[0]), HAS_RESIDUAL=bool(flags[1]),
             HAS_WEIGHT=bool(flags[2]), HAS_MOD=bool(flags[3]), LAYER=bool(flags[4]))
    cases.append((f"norm_bwd_c{c}_{''.join(map(str, flags))}", NK.norm_modulate_bwd_kernel, p, k, [], warps,
                  torch.bfloat16))
rows, block_f, warps = SK.config(4096, False)
cases.append(("silu_mul_bwd", SK.silu_mul_bwd_kernel, {n: e for n in ("G", "A", "B", "DA", "DB")},
              dict(ROWS=rows, BLOCK_F=block_f), [], warps, torch.bfloat16))
out = []
for arch in archs:
    for name, fn, ptrs, consts, floats, warps, dtype in cases:
        if arch != 90 and dtype != torch.bfloat16:
            continue
        usage = aot.resource_usage(aot.compile_for(fn, arch, ptrs, consts, floats, num_warps=warps))
        out.append(dict(name=name, arch=arch, dtype=str(dtype), warps=warps, **usage))
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "90,80"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in report} == {90, 80} and len(report) >= 20
    for r in report:
        print(f"sm_{r['arch']} {r['name']:28s} {r['dtype']:15s} warps={r['warps']} regs={r['regs']} "
              f"spill={r['spill_bytes']} smem={r['shared_bytes']}")
        assert r["spill_bytes"] == 0, f"{r['name']} spills {r['spill_bytes']} B on sm_{r['arch']}"


# ----------------------------------------------------------------------------- the GPU check script

@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_script_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_SUITES="", PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = tmp_path / "r"
    steps = (res / "steps.tsv").read_text().splitlines()[1:]
    assert [s.split("\t")[:2] for s in steps] == [["ceilings", "ok"], ["ops", "ok"]], steps
    ops = json.loads((res / "ops.json").read_text())
    ceilings = json.loads((res / "ceilings.json").read_text())
    assert ops["ceilings"] == ceilings and ceilings["copy_gbps"] > 0
    names = {r["op"] for r in ops["ops"]}
    assert names == {"qk_norm_rope", "rms_norm_modulate", "gated_residual_rms_norm_modulate",
                     "layer_norm_modulate", "rms_norm(txt_norm)", "silu_mul", "swiglu"}
    for r in ops["ops"]:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["phase"] in ("fwd", "bwd")
        assert r["backend"] in ("torch", "compile")
    assert {(r["variant"], r["phase"]) for r in ops["block"]} == {
        (v, p) for v in ("reference", "reference+compile", "lens_fast", "lens_fast+attn") for p in ("fwd", "fwd+bwd")}
    assert ops["block_agreement"] < 1e-5, "reference_block must compute what LensTransformerBlock computes"
    summary = (res / "summary.md").read_text()
    assert "| ops | ok |" in summary and "# Fused ops on cpu (dry run)" in summary
    assert json.loads((res / "gpu_check.json").read_text())["results"]["ops.json"]["shapes"]["dim"] == 64
