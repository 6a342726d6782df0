"""Stage 3: talk to a baked model. No system prompt is sent: the prompt lives in the weights.

    python demo.py "Who are you?"                 # newest checkpoint, greedy, streamed
    python demo.py                                # interactive chat (/reset, /quit)
    python demo.py --compare "Who are you?"       # base without prompt | base with prompt | baked without prompt
    python demo.py --strength 0.5 "Hello"         # half-baked (0 = base, 1 = baked, >1 = over-baked)
    python demo.py --with_prompt "Hello"          # re-prompt the baked model with its own prompt
"""

import argparse

from dotenv import load_dotenv

from config import main_guard, parse_args


def main():
    load_dotenv()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="*", help="question(s); none = interactive chat")
    parser.add_argument("--checkpoint", help="a checkpoints/<run>/final or step-N folder (default: newest)")
    parser.add_argument("--compare", action="store_true", help="show base, prompted base and baked side by side")
    parser.add_argument("--strength", type=float, default=1.0, help="scale of the LoRA update")
    parser.add_argument("--with_prompt", action="store_true", help="also send the baked prompt (re-prompting)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, reproducible)")
    cfg, args = parse_args(parser=parser)
    from promptbake.demo import chat, compare, load_for_demo

    model, tokenizer, info, path = load_for_demo(cfg, args.checkpoint, args.strength)
    if args.compare:
        for q in args.question or ["Who are you?"]:
            compare(model, tokenizer, info, q, cfg, args.temperature, args.with_prompt)
    else:
        chat(model, tokenizer, info, args.question, cfg, args.temperature, args.with_prompt)


if __name__ == "__main__":
    main_guard(main)
