#!/bin/bash
# The GPU check as one command, on a machine with a CUDA GPU and plain torch (no Ray or FAISS
# needed; DeepSpeed only for the `llm` section), from the repo root with the pack made here first:
#   python benchmarks/gpu_check.py pack --out .gpu_pack --data $IR_DATA_DIR/scifact
#   OUT=outputs/gpu_check bash benchmarks/gpu_check.sh
# (EXTRA_PYTHONPATH: where carried wheels were installed, e.g. /tmp/site.)  On an H200, sections
# llm,encode,encode_base at --docs 2048 took 305 s (BENCHMARKS.md, session 11).
# 1. benchmarks/gpu_check.py run: encode / rerank / train_loop throughput per precision, auto's
#    decision, exact resume (CUDA RNG), DeepSpeed ZeRO-2 bf16 + LoRA on a Qwen2-0.5B-shaped body;
# 2. the CUDA variants of the tests that have one (GradCache equality and dropout replay, RNG files);
# 3. GradCache memory/time at batch 256 and 1024.  PARTS (default "check tests gradcache") picks
# which; CHECK_ARGS goes to gpu_check.py run (e.g. "--sections llm,encode --docs 2048").
set -u
PARTS=" ${PARTS:-check tests gradcache} "
export PYTHONPATH=$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $PY -c "import torch, transformers, peft, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -n 1
} | tee "$OUT/env.txt"
[[ $PARTS == *" check "* ]] && { timeout "${CHECK_TIMEOUT:-260}" $PY benchmarks/gpu_check.py run --pack .gpu_pack --out "$OUT" ${CHECK_ARGS:-} 2>&1 \
  | grep -vE "Warning|warnings.warn|LOAD REPORT|^Key|^-+\+|^classifier|^Notes|MISSING" > "$OUT/gpu_check.log"
tail -n 80 "$OUT/gpu_check.log"; }
[[ $PARTS == *" tests "* ]] && timeout "${PYTEST_TIMEOUT:-75}" $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_grad_cache.py tests/test_train_loop.py \
  -k "cuda or rng_files" -rA 2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.log"
[[ $PARTS == *" gradcache "* ]] || exit 0
$PY - <<'PY'
import torch
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(".gpu_pack/model"), add_pooling_layer=False).save_pretrained("/tmp/minilm_shape")
AutoTokenizer.from_pretrained(".gpu_pack/model").save_pretrained("/tmp/minilm_shape")
PY
for b in ${GC_BATCHES:-256 1024}; do
  timeout "${GC_TIMEOUT:-60}" $PY benchmarks/grad_cache.py --model /tmp/minilm_shape --device ${GC_DEVICE:-cuda} --batch $b --negatives 1 \
    --query-max-length 64 --doc-max-length 256 --chunks 0 128 64 32 --warmup 1 --repeats 3 2>&1 \
    | grep -vE "Loading|Warning" | tee "$OUT/grad_cache_$b.log"
done
