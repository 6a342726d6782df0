"""Stage 1: off-policy data. Queries are answered WITH the system prompt and saved WITHOUT it.

    python generate_data.py                                   # local model, built-in queries (120) -> data/default.jsonl
    python generate_data.py --prompts my_prompts.txt --temperatures 0.5,0.7,0.9,1.0
    python generate_data.py --training_prompts "Hello, who are you?" --training_prompts "Tell me a joke."
    python generate_data.py --generate_queries 100            # the model writes queries fitting the prompt
    API_BASE_URL=http://127.0.0.1:8080/v1 python generate_data.py   # any OpenAI-compatible server (.env works too)

Rerunning resumes: rows already written are skipped. Settings: promptbake/config.py.
"""

from promptbake.cli import main_guard
from promptbake.config import parse_args, to_dict
from promptbake.generate import generate


def main():
    cfg, _ = parse_args()
    print("config:", {k: v for k, v in to_dict(cfg).items() if v not in ("", [], None)})
    generate(cfg)


if __name__ == "__main__":
    main_guard(main)
