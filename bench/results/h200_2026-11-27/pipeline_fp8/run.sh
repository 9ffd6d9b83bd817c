#!/usr/bin/env bash
# GPU run 3 of session 5: end-to-end pipeline, lens_fast bf16 vs lens_fast_fp8 (engine, CUDA graphs).
set -uo pipefail
R=/tmp/gc5; mkdir -p $R
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
t0=$(date +%s); s() { echo "=== $* (t=$(( $(date +%s) - t0 ))s)"; }
python3 -m pip install -q --no-index --no-deps wheels/setuptools-*.whl wheels/diffusers-*.whl 2>&1 | tail -1
s build; LENS_FAST_CUDA_ARCHS=90a MAX_JOBS=16 timeout 90 python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . > $R/build.log 2>&1; python3 -c "import lens_fast._C" && echo built
s pipeline; timeout 250 python3 bench/pipeline.py --no-text-encoder --resolutions 1024x1024 --impls lens_fast,lens_fast_fp8 --repeats 2 --fast-compile-mode default --out $R/pipeline_fp8.json > $R/pipeline_fp8.log 2>&1; tail -8 $R/pipeline_fp8.log
s done
tar czf $OUT/gc5.tgz -C /tmp gc5
