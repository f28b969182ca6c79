#!/bin/bash
# The GPU check as one command, on a machine with a CUDA GPU and plain torch (no Ray, FAISS or
# DeepSpeed needed), from the repo root with the pack made here first:
#   python benchmarks/gpu_check.py pack --out .gpu_pack --data $IR_DATA_DIR/scifact
#   OUT=outputs/gpu_check bash benchmarks/gpu_check.sh
# 1. benchmarks/gpu_check.py run: encode / rerank / train_loop throughput per precision, auto's
#    decision, exact resume (CUDA RNG); 2. the CUDA variants of the tests that have one
#    (GradCache equality and dropout replay, RNG files); 3. GradCache memory/time at batch 256 and 1024.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $PY -m pip list 2>/dev/null | grep -iE "^(torch|transformers|sentence-transformers|tokenizers|safetensors|pyarrow|onnxruntime|pytest) "
} | tee "$OUT/env.txt"
timeout "${CHECK_TIMEOUT:-330}" $PY benchmarks/gpu_check.py run --pack .gpu_pack --out "$OUT" 2>&1 \
  | grep -vE "Warning|warnings.warn|LOAD REPORT|^Key|^-+\+|^classifier|^Notes|MISSING" > "$OUT/gpu_check.log"
tail -n 70 "$OUT/gpu_check.log"
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_grad_cache.py tests/test_train_loop.py \
  -k "cuda or rng_files" -rA 2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.log"
$PY - <<'PY'
import torch
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(".gpu_pack/model"), add_pooling_layer=False).save_pretrained("/tmp/minilm_shape")
AutoTokenizer.from_pretrained(".gpu_pack/model").save_pretrained("/tmp/minilm_shape")
PY
for b in 256 1024; do
  timeout 90 $PY benchmarks/grad_cache.py --model /tmp/minilm_shape --device cuda --batch $b --negatives 1 \
    --query-max-length 64 --doc-max-length 256 --chunks 0 128 64 32 --warmup 1 --repeats 3 2>&1 \
    | grep -vE "Loading|Warning" | tee "$OUT/grad_cache_$b.log"
done
