"""Tensor parallelism from the plans that model families declare as data (`_tp_plan`: module pattern -> style).

`apply_tp(model, tp_mesh)` turns a plain model into one whose planned Linears/Embeddings hold DTensor shards, using
DTensor's `parallelize_module`. `TensorParallelLoadHook` is the loader hook behind
`from_pretrained(tp_plan="auto", device_mesh=...)`: each rank reads only its slice of every sharded weight from
safetensors, so no rank ever materialises a full copy.

Styles: "colwise" (output features split), "rowwise" (input features split, outputs summed), "colwise_rep" (colwise
with the output gathered: an LM head whose logits every rank needs), "rowwise_rep" (rowwise taking a replicated
input), "embedding" (vocabulary-parallel embedding), "sequence_parallel" (norms over a sequence-sharded activation),
"packed_colwise:N" (a fused projection whose output rows are N equal blocks, e.g. ModernBERT's q|k|v and input|gate:
each block is split colwise, so a rank holds its share of every block, in block order; the parameter is a DTensor
placed `_StridedShard(0, split_factor=N)`, so gathering it gives the checkpoint's layout back).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from loom.load_hooks import LoadHook

STYLES = ("colwise", "rowwise", "colwise_rep", "rowwise_rep", "embedding", "sequence_parallel", "packed_colwise")

# style -> (shard dim of weight, shard dim of bias); None = replicated
_SHARD_DIMS = {
    "colwise": (0, 0),
    "colwise_rep": (0, 0),
    "rowwise": (1, None),
    "rowwise_rep": (1, None),
    "embedding": (0, None),
    "sequence_parallel": (None, None),
    "packed_colwise": (0, 0),
}


def _split_style(style: str) -> tuple[str, int | None]:
    """'packed_colwise:3' -> ('packed_colwise', 3); any other style -> (style, None)."""
    name, _, blocks = style.partition(":") if isinstance(style, str) else (style, "", "")
    if name == "packed_colwise":
        if not blocks.isdigit() or int(blocks) < 2:
            raise ValueError(f"tensor-parallel style {style!r}: write packed_colwise:N with N >= 2 the number of "
                             "blocks packed in the weight's output rows (e.g. packed_colwise:3 for a fused q|k|v)")
        return name, int(blocks)
    return style, None


def packed_shard(t: torch.Tensor, dim: int, blocks: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of each of the `blocks` equal blocks of `t` along `dim`, concatenated in block order."""
    size = t.shape[dim] // blocks
    if t.shape[dim] % blocks or size % world:
        raise ValueError(f"a packed_colwise weight of {t.shape[dim]} rows in {blocks} blocks cannot be split evenly "
                         f"over {world} ranks; choose a tensor-parallel size that divides {t.shape[dim] // blocks}")
    start, stop = shard_bounds(size, rank, world)
    return torch.cat([t.narrow(dim, b * size + start, stop - start) for b in range(blocks)], dim)


def _packed_colwise(blocks: int):
    """ColwiseParallel for a weight of `blocks` packed blocks: the parameter keeps each rank's rows of every block
    (a `_StridedShard`), and the output stays the local product, whose last dim the model splits into the blocks."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class PackedColwiseParallel(ColwiseParallel):
        def _partition_linear_fn(self, name, module, mesh):
            for pname, param in list(module.named_parameters(recurse=False)):
                if isinstance(param, DTensor):  # loaded shard by shard
                    continue
                local = packed_shard(param.detach(), 0, blocks, mesh.get_local_rank(), mesh.size())
                dt = DTensor.from_local(local, mesh, [_StridedShard(0, split_factor=blocks)], run_check=False,
                                        shape=param.shape, stride=param.stride())
                module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            return outputs.to_local()  # a Shard(-1) redistribution would mix the blocks

    return PackedColwiseParallel()


def parallel_style(style: str):
    """The DTensor ParallelStyle for a plan entry."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    name, blocks = _split_style(style)
    if name == "packed_colwise":
        return _packed_colwise(blocks)
    factories = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "sequence_parallel": lambda: SequenceParallel(sequence_dim=1),
    }
    if style not in factories:
        raise ValueError(f"unknown tensor-parallel style {style!r}; use one of {', '.join(STYLES)}")
    return factories[style]()


def _pattern_regex(pattern: str, prefix: str) -> re.Pattern:
    """A plan pattern ('model.layers.*.mlp.up_proj') as a regex; '*' matches one name component."""
    body = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    if prefix and pattern.startswith(prefix + "."):  # the base model has no prefix on its own names
        body = f"(?:{re.escape(prefix)}\\.)?" + body[len(re.escape(prefix)) + 2:]
    return re.compile(f"^{body}$")


def resolve_plan(model: nn.Module, tp_plan: str | dict[str, str] | None = "auto") -> dict[str, str]:
    """Map each module of `model` that a plan entry matches to its style; clear errors for missing or bad plans."""
    if tp_plan is None or tp_plan == "auto":
        plan = dict(getattr(model, "_tp_plan", None) or {})
        if not plan:
            raise ValueError(f"{type(model).__name__} declares no tensor-parallel plan (_tp_plan is empty), so "
                             "tp_plan='auto' cannot shard it; pass tp_plan={module pattern: style} explicitly, or "
                             "load it without tp_plan")
    elif isinstance(tp_plan, dict):
        plan = dict(tp_plan)
    else:
        raise ValueError(f"tp_plan must be 'auto' or a dict of module pattern -> style, got {tp_plan!r}")
    for pattern, style in plan.items():
        if _split_style(style)[0] not in STYLES:
            raise ValueError(f"tp_plan[{pattern!r}] = {style!r} is not a known style; use one of {', '.join(STYLES)}")
    prefix = getattr(model, "base_model_prefix", "")
    regexes = [(_pattern_regex(p, prefix), s) for p, s in plan.items()]
    resolved = {}
    for name, module in model.named_modules():
        for regex, style in regexes:
            if name and regex.match(name):
                resolved[name] = style
                break
    if not resolved:
        raise ValueError(f"no module of {type(model).__name__} matches the tensor-parallel plan "
                         f"({', '.join(plan)}); check the module names with model.named_modules()")
    _drop_inconsistent_ties(model, resolved)
    return resolved


def _drop_inconsistent_ties(model: nn.Module, plan: dict[str, str]) -> None:
    """A tied pair (lm_head <- embeddings) is one tensor: it can be sharded only if both sides shard it the same way;
    otherwise both stay replicated (GPT-2 ties its head to an embedding that its plan does not split)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    for target, source in getattr(model, "_tied_weights_keys", {}).items():
        mods = [name.rpartition(".")[0] for name in (target, source)]
        dims = [_SHARD_DIMS[_split_style(plan[m])[0]][0] if m in plan else None for m in mods]
        if dims[0] != dims[1]:
            for m in mods:
                plan.pop(m, None)


def check_divisible(model: nn.Module, tp_size: int) -> None:
    """Raise a clear error when attention heads or kv heads cannot be split evenly across `tp_size` ranks."""
    config = getattr(model, "config", None)
    if config is None or tp_size == 1:
        return
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is not None and heads % tp_size:
        raise ValueError(f"tensor parallel size {tp_size} does not divide num_attention_heads={heads}; choose a "
                         f"tp size that divides it (tp larger than the head count is never possible)")
    if kv_heads is not None and kv_heads % tp_size:
        raise ValueError(f"tensor parallel size {tp_size} does not divide num_key_value_heads={kv_heads}; choose a "
                         "tp size that divides the number of key/value heads")


def _tp_mesh(device_mesh):
    """The 1-D tensor-parallel mesh: the 'tp' dimension of a named mesh, a 1-D mesh as given, or the whole world."""
    if device_mesh is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from loom.distributed.mesh import default_device, init_distributed

        if not init_distributed():
            raise RuntimeError("tensor parallelism needs several processes: launch with torchrun, or pass "
                               "device_mesh=")
        return init_device_mesh(default_device().type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    from loom.distributed.mesh import settle_gloo_at_exit

    settle_gloo_at_exit()
    names = device_mesh.mesh_dim_names or ()
    if device_mesh.ndim == 1:
        return device_mesh
    if "tp" in names:
        return device_mesh["tp"]
    raise ValueError(f"device_mesh has dimensions {names}; tensor parallelism needs a 1-D mesh or one with a 'tp' "
                     "dimension")


def apply_tp(model: nn.Module, tp_mesh, tp_plan: str | dict[str, str] | None = "auto") -> nn.Module:
    """Shard `model` in place over `tp_mesh` by its plan; returns the model.

    Parameters that already are DTensors on `tp_mesh` with the planned placement (loaded shard by shard) are kept.
    Tied weights (lm_head <- embeddings) are re-tied to the sharded parameter afterwards.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp_mesh = _tp_mesh(tp_mesh)
    check_divisible(model, tp_mesh.size())
    plan = resolve_plan(model, tp_plan)
    parallelize_module(model, tp_mesh, {name: parallel_style(style) for name, style in plan.items()})
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model._loom_tp_mesh = tp_mesh
    return model


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's piece of `size` rows, split as torch.chunk / DTensor's Shard split them."""
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


class TensorParallelLoadHook(LoadHook):
    """The load hook behind from_pretrained(tp_plan=...): each rank reads its shard of planned weights straight from
    the file, and the model is sharded by its plan once loaded."""

    @classmethod
    def for_load(cls, request) -> "TensorParallelLoadHook | None":
        return None if request.tp_plan is None else cls(request.tp_plan, request.device_mesh)

    def __init__(self, tp_plan: str | dict[str, str] | None, device_mesh=None) -> None:
        self.tp_plan = tp_plan
        self.device_mesh = device_mesh
        self.mesh = None
        self.shards: dict[str, tuple[int, tuple[int, ...]]] = {}  # param name -> (dim, global shape)

    def prepare_model(self, model: nn.Module) -> None:
        self.packed: dict[str, int] = {}  # param name -> blocks, for packed_colwise weights
        self.mesh = _tp_mesh(self.device_mesh)
        check_divisible(model, self.mesh.size())
        plan = resolve_plan(model, self.tp_plan)
        for module_name, style in plan.items():
            module = model.get_submodule(module_name)
            style, blocks = _split_style(style)
            weight_dim, bias_dim = _SHARD_DIMS[style]
            if style == "colwise" and isinstance(module, nn.Embedding):
                weight_dim = 1  # an Embedding's output features are its weight's columns (MPNet's per-head bias)
            for attr, dim in (("weight", weight_dim), ("bias", bias_dim)):
                param = getattr(module, attr, None)
                if dim is not None and isinstance(param, torch.Tensor):
                    self.shards[f"{module_name}.{attr}"] = (dim, tuple(param.shape))
                    if blocks:
                        self.packed[f"{module_name}.{attr}"] = blocks

    def load_tensor(self, model: nn.Module, name: str, source, dtype, device) -> Any:
        if name not in self.shards:
            return None
        dim, shape = self.shards[name]
        blocks = self.packed.get(name)
        rank, world = self.mesh.get_local_rank(), self.mesh.size()
        if blocks:
            size = shape[dim] // blocks
            packed_shard(torch.empty(shape[dim], device="meta"), 0, blocks, rank, world)  # the divisibility check
            start, stop = shard_bounds(size, rank, world)
            pieces = [source.slice(dim, b * size + start, b * size + stop) for b in range(blocks)]
            return torch.cat(pieces, dim).to(device=device, dtype=dtype).contiguous()
        start, stop = shard_bounds(shape[dim], rank, world)
        return source.slice(dim, start, stop).to(device=device, dtype=dtype).contiguous()

    def finish(self, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        from loom.loading import set_tensor

        for name, (dim, shape) in self.shards.items():
            blocks = self.packed.get(name)
            local = model.get_parameter(name)
            if isinstance(local, DTensor) or tuple(local.shape) == shape and self.mesh.size() > 1:
                continue  # initialised in full (missing from the checkpoint): parallelize_module will split it
            stride = torch.empty(shape, device="meta").stride()
            placement = _StridedShard(dim, split_factor=blocks) if blocks else Shard(dim)
            dt = DTensor.from_local(local.detach(), self.mesh, [placement], shape=torch.Size(shape), stride=stride)
            set_tensor(model, name, nn.Parameter(dt, requires_grad=local.requires_grad))
        apply_tp(model, self.mesh, self.tp_plan)
