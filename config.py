"""All settings of the pipeline live in promptbake/config.py: one field each, with a comment and its valid
range. Read and edit the defaults there; override them per run with a YAML file or flags:

    python bake.py --config examples/quick.yaml --learning_rate 5e-4 --num_epochs 5

This file re-exports them so that `from config import Config` works from the project folder.
"""

from promptbake.config import Config, ConfigError, parse_args, to_dict  # noqa: F401
