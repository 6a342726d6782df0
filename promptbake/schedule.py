"""The learning-rate schedule of the bake and of the on-policy stage: linear warmup, then linear decay to 0.

The shape of transformers' get_linear_schedule_with_warmup, counted from the first optimizer step: step k of
the warmup has lr * k / warmup, so step 1 already trains. Theirs gives step 1 a learning rate of 0 (the factor
is evaluated at 0 before the first step): one step of every bake was wasted, and a one-step bake trained nothing.
It stays hand-written for that one shift: stepping their scheduler once up front would move the 0 to the last step.
"""

from __future__ import annotations

import torch


def warmup_then_decay(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * k / warmup_steps at steps k = 1..warmup_steps, then linear decay to 0 after step total_steps."""
    def factor(i: int) -> float:  # i: optimizer steps taken so far; the next step is i + 1
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        return max(0.0, (total_steps - i) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
