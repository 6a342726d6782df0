"""Data parallelism under the standard launchers: `torchrun --nproc_per_node N bake.py` or `accelerate launch bake.py`.

Both launchers start one process per rank and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
setup() reads them and joins the process group (gloo on CPU, nccl on CUDA). Without them (plain `python bake.py`)
everything here is a no-op on a world of one, so the single-process path runs exactly as before.

How a bake uses it (promptbake/train.py): every rank runs the same plan of global batches; each takes its share of
every micro-batch (rows[rank::world]), back-propagates its rows weighted by the *global* token count, and
all_reduce_grads() sums the LoRA gradients and the loss over ranks. Every rank then applies the same clipped AdamW
step, so the adapters stay identical, and the global batch, the schedule and the number of steps don't depend on
the number of processes. Only rank 0 writes checkpoints, metrics.jsonl, W&B and the console log.
With --fsdp (or accelerate's FSDP config) the model is also sharded over the ranks: promptbake/fsdp.py.

A rank that dies: under a launcher, its agent stops the others (they print one line on SIGTERM); without one,
the next collective fails (gloo: at once; nccl: after `dist_timeout` seconds) and the rank exits with one line.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass

from .errors import UserError

# torch is imported inside the functions that use it: scripts import this module first thing (quiet_unless_main,
# and cli.main_guard's rank on an error line), and a bad setting's one line must not wait seconds for torch.

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RESUME_HINT = "rerun the same command with --resume to continue from the last step-N checkpoint"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def share(self, rows: list) -> list:
        """This rank's rows of a micro-batch: every size-th row, so shares differ by one row at most."""
        return rows[self.rank::self.size]


SINGLE = World()
_world = SINGLE
_sharded_on = None  # the device of the FSDP-sharded model (promptbake/fsdp.py); None without FSDP
_at_shutdown: list = []  # what fsdp.py resets when the process group ends


def world_from_env(environ=None) -> World:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK; a world of one when they are absent."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return SINGLE
    try:
        rank, size = int(environ.get("RANK", "0")), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        got = ", ".join(f"{k}={environ.get(k)!r}" for k in ENV)
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {got}; start with torchrun or accelerate "
                        f"launch") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={size}); start with torchrun or accelerate launch")
    return World(rank, size, local)


def backend_for(device: str) -> str:
    """nccl for CUDA, gloo for CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def world() -> World:
    return _world


def setup(device: str, timeout_s: float) -> World:
    """Joins the process group when a launcher started several processes; returns this process's World.
    On CUDA each rank takes GPU LOCAL_RANK. Ranks other than 0 go quiet: their stdout is dropped, and progress
    bars are off (errors still reach stderr)."""
    global _world
    w = world_from_env()
    if not w.enabled:
        return w
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if w.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={w.local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                            f"lower --nproc_per_node")
        torch.cuda.set_device(w.local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"rank {w.rank}: could not join the other {w.size - 1} process(es) at "
                            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({str(e).splitlines()[0][:160]})"
                            f"; check MASTER_ADDR/MASTER_PORT, or start with torchrun --standalone") from None
    _world = w
    quiet_unless_main()
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return w


def quiet_unless_main(environ=None) -> None:
    """Ranks other than 0 print nothing to stdout and show no progress bars; errors still reach stderr.
    Scripts call it first thing, so even their start-up lines come once."""
    environ = os.environ if environ is None else environ
    if environ.get("RANK", "0") in ("", "0") or getattr(sys.stdout, "name", None) == os.devnull:
        return
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    from transformers.utils import logging

    logging.disable_progress_bar()


def _stopped_by_launcher(signum, frame):
    print(f"rank {_world.rank}: stopped by the launcher (another rank failed: see its error above); {RESUME_HINT}",
          file=sys.stderr, flush=True)
    os._exit(143)


def mark_sharded(device, on_shutdown=None) -> None:
    """promptbake/fsdp.py tells this module that the model is sharded (on `device`), and what to reset at
    shutdown: it imports this module, never the other way round."""
    global _sharded_on
    _sharded_on = device
    if on_shutdown is not None:
        _at_shutdown.append(on_shutdown)


def shutdown() -> None:
    global _world, _sharded_on
    while _at_shutdown:
        _at_shutdown.pop()()
    _sharded_on = None
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _world = SINGLE


def lost_peer(e: Exception) -> UserError:
    """The one line a rank prints when a collective fails because another rank died or hung."""
    return UserError(f"rank {_world.rank}/{_world.size}: lost contact with the other ranks ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}): a rank died or stalled longer than "
                     f"--dist_timeout; {RESUME_HINT}")


def _collective(fn, *args):
    import torch.distributed as dist

    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as e:
        raise lost_peer(e) from None


def barrier() -> None:
    if _world.enabled:
        import torch.distributed as dist

        _collective(dist.barrier)


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank."""
    if not _world.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


def broadcast_params(params) -> None:
    """Rank 0's values of these parameters on every rank (the adapter starts identical everywhere)."""
    if not _world.enabled or _sharded():  # FSDP shards differ by rank: nothing to copy
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            _collective(dist.broadcast, p.data, 0)


def all_reduce_grads(params, *scalars: float) -> list[float]:
    """Sums the gradients of `params` and the `scalars` over ranks, in one all-reduce; returns the summed scalars.
    A rank without rows this step (a micro-batch smaller than the world) contributes zeros.
    Under FSDP the gradients are already summed (FSDP reduce-scatters them in backward): only the scalars are."""
    if not _world.enabled:
        return list(scalars)
    import torch
    import torch.distributed as dist

    if _sharded():
        flat = torch.tensor(scalars, dtype=torch.float32, device=_sharded_on)
        _collective(dist.all_reduce, flat)
        return flat.tolist()
    device = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor(scalars, dtype=torch.float32, device=device)])
    _collective(dist.all_reduce, flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset:].tolist()


def _sharded() -> bool:
    return _sharded_on is not None
