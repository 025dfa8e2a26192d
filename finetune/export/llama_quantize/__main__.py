"""python -m finetune.export.llama_quantize SRC DST LLAMA_FTYPE_NAME THREADS [--imatrix NPZ] [--tensor-types JSON]:
the quantizer's child process (finetune.export.converter.quantize_gguf starts it); exits with
llama_model_quantize's return code."""

import sys

from finetune.export.llama_quantize import quantize

sys.exit(quantize(sys.argv[1:]))
