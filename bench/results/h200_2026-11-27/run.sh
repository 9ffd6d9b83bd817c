#!/usr/bin/env bash
# GPU run of session 5: build, all GPU tests, train_step (unmeasured so far), fp8, attention.
set -uo pipefail
R=/tmp/gc3; mkdir -p $R
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
t0=$(date +%s); s() { echo "=== $* (t=$(( $(date +%s) - t0 ))s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/nvidia-smi.txt 2>&1; cat $R/nvidia-smi.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee $R/versions.txt
python3 -m pip install -q --no-index --no-deps wheels/setuptools-*.whl wheels/diffusers-*.whl 2>&1 | tail -1
s build; LENS_FAST_CUDA_ARCHS=90a MAX_JOBS=16 timeout 90 python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . > $R/build.log 2>&1; python3 -c "import lens_fast._C" && echo built
s pytest; timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -m cuda tests 2>&1 | tee $R/pytest.log | tail -15
s train_step; timeout 130 python3 bench/train_step.py --out $R/train_step.json 2>&1 | tee $R/train_step.log | grep -v "^\[rank0\]:  " | tail -15
s fp8; timeout 70 python3 bench/fp8.py --out $R --rep-ms 30 --step-rep-ms 600 > $R/fp8.log 2>&1; grep -E "^step|TFLOP" $R/fp8.log | grep -E "step|img_qkv" | tail -8
s done
tar czf $OUT/gc3.tgz -C /tmp gc3
