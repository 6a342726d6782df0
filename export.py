"""Stage 5: the baked model where people run models.

    python export.py                                   # newest checkpoint, every format that can be made here
    python export.py --checkpoint checkpoints/default/final --formats merged,gguf,ollama,adapter --out exports/default
    python export.py --private_prompt                  # the model card shows the prompt's sha256, not the prompt

merged: a plain HF folder (every adapter of the lineage merged in); gguf: f16 and q8_0 by llama.cpp's own
converters (installed by `make export`; skipped with the reason when absent), plus the adapter alone as a GGUF
LoRA; ollama: a Modelfile beside the GGUF; adapter: the PEFT folder with the base model's public id, checked
for vLLM. Each folder gets a model card (README.md). An existing --out is refused unless --overwrite (the setting).
"""

import argparse

from promptbake.cli import main_guard
from promptbake.config import parse_args
from promptbake.export import FORMATS, GGUF_TYPES, export


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoints/<run>/final or step-N folder (default: newest)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {','.join(FORMATS)} (default: all)")
    parser.add_argument("--out", help="output folder (default: exports/<name>)")
    parser.add_argument("--private_prompt", action="store_true", help="the model card names the prompt by its sha256 only")
    parser.add_argument("--base_model_id", help="the base model's hub id, for a bake on a local folder")
    parser.add_argument("--gguf_types", default=",".join(GGUF_TYPES), help="comma list of f16,q8_0 (the merged model) "
                        "and lora (the adapter alone); default: all")
    cfg, args = parse_args(parser=parser)
    export(cfg, args.checkpoint, args.formats, args.out, cfg.overwrite, args.private_prompt, args.base_model_id,
           args.gguf_types)


if __name__ == "__main__":
    main_guard(main)
