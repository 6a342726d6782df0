"""bf16 autocast for the student's transformer matmuls, where the hardware does bf16 natively.

On CPU the base model is held in fp32. A CPU with native bf16 (avx512_bf16 or AMX) multiplies in bf16 several
times faster, so the student's forward and backward run under torch.autocast(bf16) there: linear layers compute
in bf16, while the LoRA weights, the optimizer state, the residual stream, log_softmax and the loss stay fp32.
The output head's two matmuls (logits, and the gradient back to the hidden state) run in bf16 too: at a
49k-token vocabulary they are a third of a step's FLOPs, and fp32 runs them 3-7x slower; the logits are cast
to fp32 before the softmax (`head_dtype`, loss.head_loss). The teacher's log-probabilities and every
evaluation stay fp32: bf16 would put its rounding noise (~0.03 nats per log-prob, benchmarks/levers_checks.json)
into the targets and the figures. A GPU already holds the base in bf16, so autocast adds nothing there.
"""

from __future__ import annotations

import contextlib
import functools

import torch

CHOICES = ["auto", "on", "off"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 avx512_bf16 / AMX, or Arm's bf16 extension)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: trust torch's own detection, where it has one
        probe = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def use_bf16(setting: str, device: str) -> bool:
    """The `bf16` setting resolved for a device: auto = on for a CPU with native bf16, off elsewhere."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device == "cpu" and cpu_has_native_bf16()


def autocast(enabled: bool, device) -> contextlib.AbstractContextManager:
    """torch.autocast to bf16 on `device` (a torch.device or its type); a no-op when not enabled."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(kind, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def head_dtype(enabled: bool) -> torch.dtype | None:
    """The dtype of the student's head matmuls in training: bf16 with autocast, else the model's own."""
    return torch.bfloat16 if enabled else None


def describe(enabled: bool, setting: str, device: str) -> str:
    why = "this CPU has native bf16" if enabled and setting == "auto" else \
        "no native bf16 on this CPU" if setting == "auto" and device == "cpu" else \
        "the model already runs in its own dtype on this device" if setting == "auto" else f"--bf16 {setting}"
    rest = "the head's matmuls bf16 too; attention on CPU, softmax, loss and teacher fp32" if enabled else \
        "teacher, head and loss fp32"
    return f"student matmuls: {'bf16 autocast' if enabled else 'model dtype'} ({why}); {rest}"
