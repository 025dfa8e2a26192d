"""Fetch llama.cpp's HF -> GGUF converter (with its gguf-py) into the cache, once.

    python scripts/fetch_llama_cpp_converter.py [--sdist llama_cpp_python-0.3.36.tar.gz]

The converter ships in the llama-cpp-python sdist (vendor/llama.cpp/); the gguf stage does this on
first use, this script does it ahead of time (e.g. while online, or from an sdist you copied over).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.export.converter import converter_dir, llama_cpp_version  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help="a local llama_cpp_python-<version>.tar.gz instead of `pip download`")
    ap.add_argument("--version", default=None, help=f"llama-cpp-python version (default: installed, {llama_cpp_version()})")
    args = ap.parse_args()
    if args.sdist:
        os.environ["FINETUNE_LLAMA_CPP_SDIST"] = str(Path(args.sdist).resolve())
    print(converter_dir(args.version))


if __name__ == "__main__":
    main()
