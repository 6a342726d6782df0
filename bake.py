"""Stage 2: bake the system prompt into LoRA weights.

    python bake.py                          # data/default.jsonl -> checkpoints/default/final/
    python bake.py --num_epochs 5 --learning_rate 5e-4
    python bake.py --resume                 # continue checkpoints/<name>/ from its last step-N
    python bake.py --config examples/two_targets.yaml
    torchrun --nproc_per_node 4 bake.py     # data-parallel on 4 GPUs (or: accelerate launch bake.py)
    torchrun --nproc_per_node 4 bake.py --fsdp   # the base model sharded over them (promptbake/fsdp.py)

The prompted teacher's top-K log-probabilities are cached once under data/cache/ and reused. Metrics go
to checkpoints/<name>/metrics.jsonl and W&B (offline without WANDB_API_KEY); the page to look at the bake is
checkpoints/<name>/report.html. Settings: promptbake/config.py.
"""

from promptbake.cli import main_guard
from promptbake.config import parse_args, to_dict
from promptbake.distributed import quiet_unless_main


def main():
    quiet_unless_main()  # under torchrun / accelerate launch, rank 0 alone prints
    cfg, _ = parse_args()
    print("config:", to_dict(cfg))
    from promptbake.stages import bake  # torch and transformers load after the settings pass: a bad one fails fast

    bake(cfg)


if __name__ == "__main__":
    main_guard(main)
