"""Collectives for contrastive losses: gather with autograd, rank offsets, no-grad gathers, all with a
single-process fallback so the same code runs in one process, under `torchrun` or under `accelerate launch`.

Each rank computes the loss of its LOCAL anchors against the GLOBAL batch. The gather's backward sums the gradient
of every rank's loss into the rank that owns each embedding, and DDP then averages parameter gradients, so the
result equals the gradient of the mean of the per-rank losses, i.e. of the full-batch loss (tested with 2 processes).

Under `--torch_compile` the collectives here run eagerly (`outside_compiled_graphs`: a graph break at each call in a
process group; in one process their identity is traced as before). Traced into an Inductor graph they became
functional collectives whose works the graph left registered and never waited on (torch warned of 27 "unwaited
collective calls" after two compiled 4-step gloo runs), and a CI run of that 2-process test aborted a rank inside such
a graph. Eager, they take the tested eager path; the break costs nothing, since the size exchange before each gather
(`.item()`) breaks the graph anyway.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (registers torch.distributed.nn.functional, used as a fallback)

try:  # torch >= 2.6: the non-deprecated autograd-aware gather
    from torch.distributed._functional_collectives import all_gather_single_autograd as _ag_autograd
except ImportError:  # pragma: no cover - older torch
    _ag_autograd = None

T = TypeVar("T")
F = TypeVar("F", bound=Callable)


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def outside_compiled_graphs(collective: F) -> F:
    """Run `collective` eagerly when dynamo traces its caller and a process group is running (a graph break);
    without one, the call (an identity) is traced like any other code."""
    eager = torch.compiler.disable(collective)

    @functools.wraps(collective)
    def call(*args, **kwargs):
        return eager(*args, **kwargs) if is_distributed() else collective(*args, **kwargs)

    return call  # type: ignore[return-value]


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sizes)
    return [int(s.item()) for s in out]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _concat_valid(gathered: torch.Tensor, sizes: list[int], max_size: int) -> torch.Tensor:
    """Drop the padding rows of a (world * max_size, ...) gather."""
    if all(s == max_size for s in sizes):
        return gathered
    chunks = gathered.split(max_size, dim=0)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0)


@outside_compiled_graphs
def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `x` along dim 0 with autograd, allowing different row counts per rank.

    Args:
        x: This rank's rows, e.g. local embeddings of shape (local_batch, dim).

    Returns:
        The rows of all ranks in rank order, and the index of this rank's first row in that result.
    """
    if not is_distributed():
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    max_size = max(sizes)
    padded = _pad_rows(x, max_size)
    if _ag_autograd is not None:
        gathered = _ag_autograd(padded.contiguous(), gather_dim=0, group=dist.group.WORLD)
    else:  # pragma: no cover - older torch
        gathered = torch.cat(torch.distributed.nn.functional.all_gather(padded.contiguous()), dim=0)
    offset = sum(sizes[: dist.get_rank()])
    return _concat_valid(gathered, sizes, max_size), offset


@outside_compiled_graphs
@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` along dim 0 without autograd (ids, diagnostics); identity in one process."""
    if not is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    max_size = max(sizes)
    padded = _pad_rows(x, max_size).contiguous()
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return _concat_valid(torch.cat(out, dim=0), sizes, max_size)


@outside_compiled_graphs
@torch.no_grad()
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (every rank gets the same result); identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@outside_compiled_graphs
@torch.no_grad()
def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all ranks, in place; identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def row_blocks(rows: int, world_size: int) -> list[slice]:
    """`rows` split into `world_size` contiguous blocks in rank order, the first `rows % world_size` one row longer
    (a block is empty when there are fewer rows than ranks)."""
    base, extra = divmod(rows, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


@outside_compiled_graphs
@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with rank `src`'s value; identity in one process."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def end_process_group() -> None:
    """Wait for every rank, then destroy the default process group (no-op without one). Call it once at the end of a
    launched script: a gloo group left to interpreter exit can abort a rank ('terminate called without an active
    exception') after all its work is done, which turns a finished run into a failed launch."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_process_result(compute: Callable[[], T], is_main: bool | None = None, every_rank: bool = False
                        ) -> T | None:
    """Run `compute` on the main process only and hand its (picklable) result to every process.

    A collective: every rank must call it at the same point, whatever it logs, evaluates or saves. The other ranks
    wait in the broadcast of the result, so the main process's work sits between two collectives that every rank
    makes (the last one before the call and this broadcast) and no rank runs ahead into a different collective.
    The wait is bounded by the process group's timeout (`--ddp_timeout`, 30 minutes by default).

    Args:
        compute: The main process's work, e.g. an evaluation returning a dict of metrics.
        is_main: Whether this process is the main one (default: rank 0); in a process group it must be rank 0.
        every_rank: Run `compute` on every rank (it makes collectives itself, e.g. forwards of an FSDP-sharded
            model, `is_fsdp_sharded`), still handing rank 0's result to all.

    Returns:
        `compute()`'s result on every rank; without a process group, None when `is_main` is False.
    """
    if is_main is None:
        is_main = rank_and_world_size()[0] == 0
    result = [compute() if is_main or (every_rank and is_distributed()) else None]
    if is_distributed():
        dist.broadcast_object_list(result, src=0)
    return result[0]


@torch.no_grad()
def max_abs_difference_across_ranks(tensor: torch.Tensor) -> float:
    """Largest element-wise difference of `tensor` between this rank and rank 0 (0.0 in one process)."""
    if not is_distributed():
        return 0.0
    reference = tensor.detach().clone()
    dist.broadcast(reference, src=0)
    diff = (tensor.detach() - reference).abs().max() if tensor.numel() else tensor.new_zeros(())
    diff = diff.float().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
def fsdp_replicated_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters FSDP must leave whole on every rank, by name.

    - the normalizer's parameters: its `update` trains its own with its own optimizer, from statistics every rank
      shares, summing the ranks' gradient parts itself (`NormalizerInputs.sum_across_ranks_`); the few it trains with
      the encoders (SigLIP's bias) are averaged like the scalars below;
    - scalar parameters (CLIP's `logit_scale`, SigLIP's bias): FSDP2's `fully_shard` refuses 0-d tensors. They are
      trained with the encoders, so their gradients are averaged by `average_replicated_gradients_`.
    """
    # A normalizer is the module with `estimator_parameters` (normalizer_base imports this module, not vice versa).
    whole = {id(p) for module in model.modules() if callable(getattr(module, "estimator_parameters", None))
             for p in module.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in whole or p.ndim == 0}


def shard_encoders_fsdp2(
    model: torch.nn.Module,
    layer_classes: tuple[type[torch.nn.Module], ...] | None = None,
    **fully_shard_kwargs,
) -> torch.nn.Module:
    """Shard a (NeuCLIP or CLIP) model's encoders with torch's FSDP2 `fully_shard`, in place.

    Each transformer layer (`CLIPEncoderLayer` by default) becomes one FSDP unit and the root holds the embeddings,
    projections and final norms; the parameters of `fsdp_replicated_parameters` are passed as `ignored_params`, so
    the normalizer keeps updating whole tensors identically on every rank. After each backward call
    `average_replicated_gradients_(model)` (FSDP does not reduce ignored parameters).

    Args:
        model: The model, on its device, inside an initialised process group.
        layer_classes: Module classes that become their own FSDP units (default: CLIP's encoder layers).
        **fully_shard_kwargs: Passed to every `fully_shard` call (`mesh`, `mp_policy`, `reshard_after_forward`, ...).

    Returns:
        The model (now an `FSDPModule`).
    """
    from torch.distributed.fsdp import fully_shard

    if layer_classes is None:
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        layer_classes = (CLIPEncoderLayer,)
    ignored = set(fsdp_replicated_parameters(model).values())
    for module in list(model.modules()):
        if isinstance(module, layer_classes):
            fully_shard(module, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, ignored_params=ignored, **fully_shard_kwargs)
    model._fsdp_replicated_parameters = ignored  # what `average_replicated_gradients_` reduces
    return model


@torch.no_grad()
def average_replicated_gradients_(model: torch.nn.Module) -> None:
    """Average over ranks, in place, the gradients of the parameters an FSDP2 model keeps whole and trains with the
    encoders (`logit_scale`, SigLIP's bias): what DDP would have done for them. One all-reduce; no-op without FSDP2
    sharding or in one process."""
    replicated = getattr(model, "_fsdp_replicated_parameters", None)
    if not replicated or not is_distributed():
        return
    with_grad = [p for p in replicated if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for p, chunk in zip(with_grad, flat.split([p.numel() for p in with_grad])):
        p.grad.copy_(chunk.view_as(p.grad))


def is_fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` (or a module inside it) is sharded by FSDP2's `fully_shard` (`shard_encoders_fsdp2`)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


@torch.no_grad()
def broadcast_encoder_state_(model: torch.nn.Module) -> None:
    """Copy rank 0's encoder parameters and buffers to every rank, in place (what DDP does when it wraps a model),
    before `shard_encoders_fsdp2` cuts each rank's shard out of its own copy. The normalizer's own state
    (`ddp_ignored_state_names`) is left alone, as DDP leaves it. One broadcast per tensor; no-op in one process."""
    if not is_distributed():
        return
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in ignored:
            dist.broadcast(tensor.data, src=0)


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2-sharded model on rank 0, on the CPU; an empty dict on the other
    ranks. A collective: every rank calls it (each sharded tensor is all-gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds all of it, e.g. read from `model.safetensors`) into an
    FSDP2-sharded model: each rank keeps its own shard of each tensor. Strict: a missing or unexpected key raises."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


@contextmanager
def fsdp_root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside, an FSDP2-sharded model (`shard_encoders_fsdp2`) answers `get_image_features` / `get_text_features`
    / `encode_*`, not only `forward`: the root unit's parameters (embeddings, projections, final norms) are
    gathered, and each encoder layer gathers its own in its forward. A collective: every rank must make the same
    calls inside (the same evaluation). No-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextmanager
def own_class(model: torch.nn.Module) -> Iterator[None]:
    """Inside, an FSDP2-sharded model has its own class back (`NeuCLIPModel`, not torch's dynamic `FSDPNeuCLIPModel`
    subclass), so `save_pretrained` names it in config.json's `auto_map` and copies its own module's code, not
    torch's. Only for saving: no forward inside."""
    from torch.distributed.fsdp import FSDPModule

    sharded = type(model)
    if not isinstance(model, FSDPModule):
        yield
        return
    model.__class__ = next(c for c in sharded.__mro__[1:] if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded
