#!/usr/bin/env bash
# GPU run 2 of session 5: fp8 step eager vs CUDA-graph replay; quantize_rows host cost.
set -uo pipefail
R=/tmp/gc4; mkdir -p $R
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
t0=$(date +%s); s() { echo "=== $* (t=$(( $(date +%s) - t0 ))s)"; }
python3 -m pip install -q --no-index --no-deps wheels/setuptools-*.whl wheels/diffusers-*.whl 2>&1 | tail -1
s build; LENS_FAST_CUDA_ARCHS=90a MAX_JOBS=16 timeout 90 python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . > $R/build.log 2>&1; python3 -c "import lens_fast._C" && echo built
s qprobe; timeout 60 python3 wheels/qprobe.py 2>&1 | tee $R/qprobe.txt
s fp8; timeout 120 python3 bench/fp8.py --out $R --rep-ms 30 --step-rep-ms 600 > $R/fp8.log 2>&1; grep -E "^step|targets|error" $R/fp8.log
s done
tar czf $OUT/gc4.tgz -C /tmp gc4
