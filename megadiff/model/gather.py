"""Full (unsharded, layout-independent) views of a TP/PP-sharded model's tensors.

Names are global (``decoder.layers.<global index>...``), so the dict produced at any TP x PP
x VPP layout has the same keys and shapes as a single-process model's ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megadiff.model.build import global_param_name, is_glu_fc1


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _tp_gather(t: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    if is_glu_fc1(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def full_tensors(model: list[torch.nn.Module], kind: str = "param") -> dict[str, torch.Tensor]:
    """All of the model's tensors, unsharded, on every rank (collective over the world).

    ``kind``: ``param`` (weights) or ``grad`` (megatron-core DDP's ``main_grad``).
    Meant for tests, export and checks on small models; it holds the whole model in memory.
    """
    from megatron.core import parallel_state as ps

    local: dict[str, torch.Tensor] = {}
    for chunk in model:
        inner = unwrap(chunk)
        for local_name, p in inner.named_parameters():
            name = global_param_name(inner, local_name)
            t = p.detach() if kind == "param" else p.main_grad.detach()
            if getattr(p, "tensor_model_parallel", False):
                t = _tp_gather(t, name, p.partition_dim)
            local[name] = t.float().cpu().clone()
    contribute = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if contribute else {})
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part or {})
    return out


@torch.no_grad()
def load_full_tensors(model: list[torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy full (global-name) tensors into this rank's shards: the inverse of ``full_tensors``.

    Every parameter of every chunk must be in ``state`` with its full shape; no communication.
    """
    from megatron.core import parallel_state as ps

    from megadiff.model.build import tp_shard

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in model:
        inner = unwrap(chunk)
        for local_name, p in inner.named_parameters():
            name = global_param_name(inner, local_name)
            if name not in state:
                raise KeyError(f"no tensor for parameter {name!r}")
            full = state[name]
            if getattr(p, "tensor_model_parallel", False):
                full = tp_shard(full, name, p.partition_dim, tp, tp_rank)
            if tuple(full.shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter {name!r}: got shape {tuple(state[name].shape)}, which does not "
                    f"shard to this rank's {tuple(p.shape)}"
                )
            p.copy_(full.to(p.dtype))
