#!/usr/bin/env bash
# Check the CUDA path (4-bit QLoRA, bf16, evaluation) on a GPU machine that has torch but no network.
# Used through the device tool, in three calls made back to back while the machine stays warm,
# because one call carries at most 64 MiB:
#   bash scripts/gpu_check.sh install    # .whl/ carried: wheels missing there (trl, bitsandbytes, hydra, ...)
#   bash scripts/gpu_check.sh stash .gpu1 # first half of SmolLM2's GGUF (split -b), kept in /tmp
#   bash scripts/gpu_check.sh run .gpu2   # second half; joins them and runs the pipeline on CUDA
#   bash scripts/gpu_check.sh bench .gpu2 [variants] # or: joins them and runs scripts/bench_train.py
# Results (metrics.json, train summaries, logs) are copied to $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
      --upgrade --target /tmp/site .whl/*
    python3 - <<'PY'
import torch, bitsandbytes as bnb, transformers, trl, peft
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "bnb", bnb.__version__)
lin = bnb.nn.Linear4bit(576, 576, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
x = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)
print("nf4 linear on cuda ok:", tuple(lin(x).shape), lin.weight.dtype)
PY
    ;;
  stash)
    cp "$2"/* /tmp/ && ls -la /tmp/smolpart*
    ;;
  run)
    cp "$2"/* /tmp/ && cat /tmp/smolpart00 /tmp/smolpart01 > /tmp/smollm2.gguf && rm /tmp/smolpart0*
    shift 2
    common=(model.path=/tmp/smollm2.gguf export=none evaluate.max_examples=149 "$@")
    for method in qlora lora; do
      python3 -m finetune "${common[@]}" method=$method run_dir=/tmp/gpu-$method \
        stages=[data,train,evaluate] 2>&1 | grep -v "it/s\]\|examples/s\]" | tee $OUT/$method.log | tail -25
      cp /tmp/gpu-$method/metrics.json $OUT/$method-metrics.json || true
      cp /tmp/gpu-$method/stages/train.json $OUT/$method-train.json || true
    done
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee $OUT/nvidia-smi.txt
    ;;
  bench)
    # Ours vs plain TRL on the GPU, one bench_train.py per variant; logs (table + JSON line) to $OUT.
    #   variants: qlora lora qlora-packed lora-compile qlora-compile lora-b64 qlora-b64 (default: first three)
    cp "$2"/* /tmp/ && cat /tmp/smolpart00 /tmp/smolpart01 > /tmp/smollm2.gguf && rm /tmp/smolpart0*
    shift 2
    b=(python3 scripts/bench_train.py --steps 10 --rounds 3 --eval-rows 48)
    m=(model.path=/tmp/smollm2.gguf method.batch_size=16)
    variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(qlora lora qlora-packed)
    for variant in "${variants[@]}"; do
      case $variant in
        qlora|lora) args=(--method $variant "${m[@]}") ;;
        qlora-packed) args=(--method qlora --baseline-batch 16 model.path=/tmp/smollm2.gguf method.packing=true
                            method.batch_size=4) ;;
        lora-compile|qlora-compile) args=(--method ${variant%-compile} "${m[@]}" method.torch_compile=true) ;;
        # 4x the rows per step (ours) against TRL at 16: compared by the time to reach equal validation loss
        lora-b64|qlora-b64) args=(--method ${variant%-b64} --baseline-batch 16 model.path=/tmp/smollm2.gguf
                                  method.batch_size=64 --steps 3 --rounds 6) ;;
        *) echo "unknown variant $variant" >&2; exit 2 ;;
      esac
      "${b[@]}" "${args[@]}" 2>&1 | grep -v "it/s\]\|examples/s\]" | tee $OUT/bench-$variant.log | tail -8
    done
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee $OUT/nvidia-smi.txt
    ;;
  *) echo "usage: $0 install | stash DIR | run DIR [overrides...] | bench DIR [variants...]" >&2; exit 2 ;;
esac
