"""Stage 3: talk to a baked model. No system prompt is sent: the prompt lives in the weights.

    python demo.py "Who are you?"                 # newest checkpoint, greedy, streamed
    python demo.py                                # interactive chat (/reset, /quit)
    python demo.py --compare "Who are you?"       # base | base + prompt | baked | baked + prompt (re-prompted)
    python demo.py --strength 0.5 "Hello"         # half-baked (0 = base, 1 = baked, >1 = over-baked)
    python demo.py --with_prompt "Hello"          # re-prompt the baked model with its own prompt
    python demo.py --target french "Hello"        # a multi-target bake: that target's prompt and trigger
"""

import argparse

from promptbake.cli import main_guard
from promptbake.config import STRENGTH, parse_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="*", help="question(s); none = interactive chat")
    parser.add_argument("--checkpoint", help="a checkpoints/<run>/final or step-N folder (default: newest)")
    parser.add_argument("--compare", action="store_true", help="show base, prompted base, baked and baked re-prompted")
    parser.add_argument("--strength", type=float, default=1.0, help=f"scale of the LoRA update, in {STRENGTH}")
    parser.add_argument("--with_prompt", action="store_true", help="also send the baked prompt (re-prompting)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, reproducible)")
    parser.add_argument("--target", help="which target of a multi-target bake (default: the first)")
    cfg, args = parse_args(parser=parser)
    from promptbake.demo import (  # torch and transformers load after the settings pass: a bad one fails fast
        chat,
        check_questions,
        compare,
        load_for_demo,
    )
    model, tokenizer, info, path = load_for_demo(cfg, args.checkpoint, args.strength, args.temperature)
    target = info["target"] if args.target is None else args.target
    check_questions(model, tokenizer, info, args.question or ["Who are you?"], cfg, target,
                    with_prompt=args.compare or args.with_prompt)
    if args.compare:
        for q in args.question or ["Who are you?"]:
            compare(model, tokenizer, info, q, cfg, args.temperature, target)
    else:
        chat(model, tokenizer, info, args.question, cfg, args.temperature, args.with_prompt, target)


if __name__ == "__main__":
    main_guard(main)
