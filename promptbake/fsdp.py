"""FSDP for base models too big for one GPU: `torchrun --nproc_per_node N bake.py --fsdp`, or
`accelerate launch --config_file examples/accelerate_fsdp.yaml bake.py` (the config only selects it: it sets
ACCELERATE_USE_FSDP; the sharding is torch's FSDP2 `fully_shard`, applied here).

What changes against plain data parallelism (promptbake/distributed.py), and why:
  - Loading: every rank reads the base model into CPU memory (in its GPU dtype), wraps it in the LoRA adapter
    (rank 0's initial adapter is broadcast), then shards it: one FSDP unit per decoder layer, so no GPU ever holds
    the whole base, only its 1/N of every layer plus the layer being run. The embeddings, the final norm and the
    head stay whole on every rank (outside FSDP, frozen): tied embeddings stay tied, and the loss reads the head's
    weight directly. LoRA parameters may only sit inside the decoder layers (the default all-linear does).
  - Every forward is a collective (each layer is all-gathered), so every rank must run the same number of passes:
      * the teacher pass runs on the sharded model, every rank computing every missing cache shard (the same
        batches in the same order; rank 0 writes them): it costs what one GPU would take, not 1/N;
      * the shared-prefix attention (promptbake/forward.py) is off: two ranks' rows have different common
        prefixes, hence a different number of passes;
      * training: each rank runs its share of every micro-batch as before; at the end of the step a rank that
        ran fewer forward/backward passes than the busiest one runs zero-weighted ones (pad_passes), so the
        per-layer all-gathers and reduce-scatters meet;
      * evaluation, the final held-out KL and the greedy verification answers run on every rank, on the same
        rows (generation with transformers' synced_gpus); rank 0 alone prints and logs.
  - Gradients: FSDP reduce-scatters them (summed: each rank's loss is already weighted by the global token count)
    into sharded DTensor gradients; clip_grad_norm_ computes the global norm over DTensors; AdamW steps the shards.
  - Checkpoints: every rank takes part in gathering the LoRA weights and the AdamW moments (small: the adapter
    only); rank 0 writes them in the same format as an unsharded run, so a run can resume with or without FSDP
    and on another number of processes. Resuming cuts each rank's shard out of the full tensors.
Not supported under FSDP (one-line errors): the on-policy stage, CPU offload, activation checkpointing, rank-0-only
loading (cpu_ram_efficient_loading: every rank reads the whole base into CPU memory before sharding), FSDP version 1,
and prompts-only data (answer it first with one process, as under data parallelism).
"""

from __future__ import annotations

import os

import torch

from . import distributed
from .errors import UserError

_model = None  # the sharded PeftModel of this process, None when FSDP is off
_passes = 0  # forward passes with gradients since the last optimizer step (counted by a hook)
# accelerate config keys (as the environment variables accelerate launch sets) that bake.py's FSDP does not do.
# cpu_ram_efficient_loading would make transformers load the weights on rank 0 only, expecting them broadcast later.
NOT_SUPPORTED = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params", "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
                 "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading"}


def _true(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def wanted(cfg, environ=None) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    environ = os.environ if environ is None else environ
    return bool(getattr(cfg, "fsdp", False)) or _true(environ.get("ACCELERATE_USE_FSDP", ""))


def will_shard(cfg, environ=None) -> bool:
    """Whether this process (under a launcher) is going to shard the model it loads."""
    environ = os.environ if environ is None else environ
    return wanted(cfg, environ) and "WORLD_SIZE" in environ


def check(cfg, environ=None) -> None:
    """The settings FSDP can't run with, each refused in one line before anything is loaded."""
    environ = os.environ if environ is None else environ
    if not wanted(cfg, environ):
        return
    if "WORLD_SIZE" not in environ:
        raise UserError("FSDP shards the model over several processes: start them with `torchrun --nproc_per_node N "
                        "bake.py --fsdp` or `accelerate launch --config_file examples/accelerate_fsdp.yaml bake.py`")
    if _true(environ.get("ACCELERATE_USE_FSDP", "")) and environ.get("FSDP_VERSION", "2") != "2":
        raise UserError(f"the accelerate config selects FSDP version {environ.get('FSDP_VERSION')}; bake.py shards with "
                        f"FSDP2: set `fsdp_version: 2` (see examples/accelerate_fsdp.yaml)")
    for var, key in NOT_SUPPORTED.items():
        if _true(environ.get(var, "")):
            raise UserError(f"the accelerate config sets `{key}: true`, which bake.py's FSDP does not do; set it to "
                            f"false (see examples/accelerate_fsdp.yaml)")
    if cfg.onpolicy_steps:
        raise UserError("the on-policy stage (--onpolicy_steps) does not run under FSDP yet; bake with --onpolicy_steps 0 "
                        "(or without FSDP when the model fits one GPU)")


def reshard_after_forward(environ=None) -> bool:
    """FULL_SHARD (True, the default) frees each layer after its forward; SHARD_GRAD_OP keeps it until backward."""
    environ = os.environ if environ is None else environ
    return str(environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")).lower() not in ("false", "0", "shard_grad_op", "2")


def on() -> bool:
    """Whether this process's model is sharded."""
    return _model is not None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules whose class transformers never splits (`_no_split_modules`, what
    accelerate's TRANSFORMER_BASED_WRAP wraps), else backbone.layers."""
    from .forward import backbone_and_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(backbone_and_head(model)[0], "layers", []))
    if not layers:
        raise UserError(f"FSDP: found no decoder layers in {type(base).__name__} to shard")
    return layers


def shard(model, device: str):
    """Shards a LoRA-wrapped (peft) model in place over the process group: one FSDP2 unit per decoder layer, the
    backbone as the root unit (owning no parameters itself). Returns the model."""
    global _model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .forward import _DECISIONS, PrefixDecision, _base, _dtype, backbone_and_head

    world = distributed.world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_params(trainable)  # rank 0's initial adapter everywhere, before it is cut into shards
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_layers]
    if outside:
        raise UserError(f"FSDP: the adapter has trainable weights outside the decoder layers ({outside[0]}); under "
                        f"FSDP, --target_modules may only name modules inside them (all-linear does)")
    backbone, _ = backbone_and_head(model)
    mesh = init_device_mesh(torch.device(device).type, (world.size,))
    reshard = reshard_after_forward()
    units = [fully_shard(layer, mesh=mesh, reshard_after_forward=reshard) for layer in layers]
    # The root unit runs FSDP's per-iteration bookkeeping; the embeddings and the final norm it holds stay whole.
    units.append(fully_shard(backbone, mesh=mesh, ignored_params={p for p in backbone.parameters() if id(p) not in in_layers}))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided by the global token count
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    with torch.no_grad():  # what FSDP left where it was: embeddings, norms, head, rotary buffers
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if not isinstance(p, torch.distributed.tensor.DTensor) and p.device != torch.device(device):
                    p.data = p.data.to(device)
            for name, b in m.named_buffers(recurse=False):
                if b is not None and b.device != torch.device(device):
                    m._buffers[name] = b.to(device)
    # One pass outside inference mode first: FSDP keeps the whole-layer buffers its first all-gather allocates, and
    # buffers born under torch.inference_mode (the teacher pass) could not be written in training afterwards.
    with torch.no_grad():
        backbone(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    model.get_base_model()._is_fsdp_managed_module = True  # transformers' generate then syncs the ranks (synced_gpus)
    backbone.register_forward_pre_hook(_count_pass)
    base = _base(model)
    _DECISIONS[base] = PrefixDecision(False, _dtype(model), "under FSDP every rank must run the same passes, and "
                                                            "ranks' rows share different prefixes")
    print(f"FSDP: {len(layers)} decoder layers sharded over {world.size} processes ({mesh.device_type}, "
          f"reshard_after_forward={reshard}); embeddings and head whole on every rank", flush=True)
    _model = model
    distributed.mark_sharded(_device(), on_shutdown=reset)
    return model


def _count_pass(module, args):
    global _passes
    if torch.is_grad_enabled() and module.training:  # a training pass (not the teacher, not an evaluation)
        _passes += 1


def passes_per_rank(micro, targets, size: int, max_tokens: int) -> list[int]:
    """How many forward/backward passes each rank runs for these micro-batches in train_step: its share of every
    micro-batch, cut into token pieces. Every rank computes it alike from the plan, without communicating."""
    from .distributed import World
    from .forward import token_pieces

    lengths = {ti: [len(e.student_ids) for e in targets[ti].examples] for ti, _ in micro}
    return [sum(len(token_pieces(World(r, size).share(rows), lengths[ti], max_tokens)) if World(r, size).share(rows)
                else 0 for ti, rows in micro) for r in range(size)]


def pad_passes(tr, micro) -> None:
    """After a rank's passes of a step: runs zero-weighted forward/backward passes until it has run as many as the
    busiest rank (whose rows made more pieces), so that FSDP's per-layer collectives meet. A no-op without FSDP."""
    global _passes
    if _model is None:
        return
    counts = passes_per_rank(micro, tr.targets, tr.world.size, tr.max_batch_tokens)
    if _passes != counts[tr.world.rank]:  # the plan above no longer matches train_step: stop before a hang
        raise UserError(f"FSDP: rank {tr.world.rank} ran {_passes} passes this step but the plan gives it "
                        f"{counts[tr.world.rank]}; promptbake/fsdp.py passes_per_rank must follow train_step")
    from .forward import backbone_and_head

    backbone = backbone_and_head(_model)[0]
    for _ in range(max(counts) - _passes):
        hidden = backbone(input_ids=torch.zeros(1, 2, dtype=torch.long, device=_device()), use_cache=False)
        (hidden.last_hidden_state.float().sum() * 0.0).backward()
    _passes = 0


def _device():
    from .forward import backbone_and_head

    return backbone_and_head(_model)[1].weight.device


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def adapter_state(model) -> dict | None:
    """The LoRA weights gathered whole, under the names of model.state_dict() (what peft's save_pretrained
    filters). Every rank must call it; None when FSDP is off (peft reads the model itself)."""
    if model is not _model or _model is None:
        return None
    return {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded tensor gathered whole (every rank must call it)."""
    state = optimizer.state_dict()
    if _model is None:
        return state
    return {**state, "state": {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's piece of a whole tensor, laid out as `param` (a sharded DTensor), cut locally."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device_mesh.device_type, param.dtype), param.device_mesh,
                             param.placements, src_data_rank=None)


def sharded_optimizer_state(optimizer, state: dict) -> dict:
    """A whole optimizer state (as optimizer_state wrote it) cut to this rank's shards; unchanged when FSDP is off."""
    if _model is None:
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {**state, "state": {i: {k: _shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}


def load_adapter(model, weights: dict) -> None:
    """Loads saved adapter weights (adapter_model.safetensors, keys without the adapter name) into the shards."""
    from peft import set_peft_model_state_dict

    if model is not _model or _model is None:
        set_peft_model_state_dict(model, weights)
        return
    adapter = model.active_adapter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace(f".{adapter}.", ".")
            if key not in weights:
                raise KeyError(f"{key} is not in the checkpoint")
            p.copy_(_shard_like(weights[key], p))


def reset() -> None:
    global _model, _passes
    _model, _passes = None, 0
