"""llama.cpp's quantizer on one GGUF, in a child process (finetune.export.converter.quantize_gguf runs it).

    python -m finetune.export.llama_quantize SRC DST LLAMA_FTYPE_NAME THREADS [--imatrix IMATRIX.npz]
        [--tensor-types '{"REGEX": "GGML_TYPE", ...}']   (__main__.py)

A child so that Ctrl-C reaches it and us (a Python log callback inside the C call would swallow it), a
killed run takes it down with it, and llama.cpp's per-tensor log stays out of ours. With an importance
matrix (finetune.export.imatrix: HF linear-layer name -> mean x^2 per input column), the names are mapped to
the GGUF's tensor names with the vendored gguf-py (on PYTHONPATH) and handed to llama.cpp as
`llama_model_quantize_params.imatrix`; the file records it as `llama-quantize --imatrix` does
(quantize.imatrix.entries_count, quantize.imatrix.dataset). Tensor type overrides go in as
`llama_model_quantize_params.tt_overrides` (what `llama-quantize --tensor-type` sets): a tensor whose name
the regex matches is written in that ggml type instead of the one the quant type's own mix gives it.
"""

from __future__ import annotations

import ctypes

from finetune.core.errors import ExportError


def gguf_names(src: str, hf_names: list[str]) -> dict[str, tuple[str, int]]:
    """HF module name -> (GGUF tensor name, its input size) for the names the GGUF has."""
    import gguf

    reader = gguf.GGUFReader(src)

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]]

    arch_name = bytes(field("general.architecture")).decode()
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    table = gguf.get_tensor_name_map(arch, int(field(f"{arch_name}.block_count")[0]))
    tensors = {t.name: int(t.shape[0]) for t in reader.tensors}  # shape[0] is ne0: the input size
    out = {}
    for hf in hf_names:
        name = table.get_name(hf)
        if name and f"{name}.weight" in tensors:
            out[hf] = (f"{name}.weight", tensors[f"{name}.weight"])
    return out


def imatrix_params(src: str, path: str, keep: list) -> tuple[ctypes.Array, ctypes.Array]:
    """The null-terminated imatrix array and kv overrides for llama_model_quantize_params."""
    import llama_cpp
    import numpy as np

    stats = dict(np.load(path))
    names = gguf_names(src, list(stats))
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (hf, (name, size)) in enumerate(sorted(names.items(), key=lambda kv: kv[1][0])):
        values = np.ascontiguousarray(stats[hf], dtype=np.float32)
        if values.size != size:
            raise ExportError(f"importance matrix of {hf}: {values.size} values for {name}'s {size} input columns")
        key = name.encode()
        keep += [values, key]
        entries[i].name, entries[i].size = key, values.size
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if not names:
        raise ExportError(f"importance matrix: none of its {len(stats)} layer names ({next(iter(stats), '-')}, ...) "
                         f"maps to a tensor of {src}")
    kv = (llama_cpp.llama_model_kv_override * 3)()
    kv[0].key, kv[0].tag, kv[0].value.val_i64 = b"quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, \
        len(names)
    kv[1].key, kv[1].tag, kv[1].value.val_str = b"quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, \
        b"the task's training examples (finetune)"
    print(f"importance matrix: {len(names)} of {len(stats)} linear layers", flush=True)
    return entries, kv


def tensor_overrides(types: dict[str, str], keep: list) -> ctypes.Array:
    """The null-terminated tt_overrides array of {regex: ggml type name}. The type ids come from gguf-py's table,
    the one finetune.export.converter.gguf_config_problems checks the names against (llama-cpp-python has no
    constant for some of them, BF16 among them; where it has one, the id is the same)."""
    import gguf
    import llama_cpp

    entries = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    for i, (pattern, name) in enumerate(types.items()):
        key = pattern.encode()
        keep.append(key)
        entries[i].pattern, entries[i].type = key, int(gguf.GGMLQuantizationType[name.upper()])
    return entries


def quantize(argv: list[str]) -> int:
    """llama_model_quantize's return code for SRC DST LLAMA_FTYPE_NAME THREADS [--imatrix PATH]
    [--tensor-types JSON]."""
    import json

    import llama_cpp

    src, dst, ftype, threads = argv[:4]
    options = dict(zip(argv[4::2], argv[5::2]))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, ftype), int(threads)
    keep: list = []
    if "--imatrix" in options:
        entries, kv = imatrix_params(src, options["--imatrix"], keep)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if options.get("--tensor-types"):
        overrides = tensor_overrides(json.loads(options["--tensor-types"]), keep)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
