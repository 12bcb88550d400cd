"""Live models: load HF weights into this rank's Megatron shards, and export HF tensors from a sharded model.

Both walk the model's own parameters and resolve each through the architecture's mapping table, so the
same table drives offline conversion and per-step refit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkpoint_converters.hf_io import HFCheckpoint
from checkpoint_converters.mapping import ArchMapping, Rule, mapping_for, named_weights, resolve
from checkpoint_converters.transforms import assemble, hf_slices, to_hf
from megatron_rl import platform
from megatron_rl.errors import UserError

_TIED_OUTPUT = Rule("output_layer.weight", ("model.embed_tokens.weight",), "column")


def _context(chunk: Any) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = chunk.config
    experts = cfg.num_moe_experts or 0
    ep = ps.get_expert_model_parallel_world_size()
    return {
        "layer_offset": get_transformer_layer_offset(cfg, vp_stage=getattr(chunk, "vp_stage", None)),
        "expert_offset": ps.get_expert_model_parallel_rank() * (experts // ep if experts else 0),
        "heads": cfg.num_attention_heads,
        "groups": cfg.num_query_groups,
        "tied": chunk.share_embeddings_and_output_weights,
        "num_layers": cfg.num_layers,
    }


def _tp(expert: bool) -> tuple[int, int, Any]:
    from megatron.core import parallel_state as ps

    if expert:
        return (
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


def _resolve(mapping: ArchMapping, name: str, ctx: dict[str, Any], for_load: bool):
    resolved = resolve(mapping, name, ctx["layer_offset"], ctx["expert_offset"], ctx["tied"], ctx["num_layers"])
    if resolved is None and for_load:  # tied output layer copy on the last stage: load the embedding
        return _TIED_OUTPUT, _TIED_OUTPUT.hf
    return (resolved.rule, resolved.hf_names) if resolved else None


def mtp_layers(hf_config: dict[str, Any]) -> int:
    return hf_config.get("num_nextn_predict_layers") or 0


def allowed_hf_names(mapping: ArchMapping, hf_config: dict[str, Any]) -> set[str]:
    layers = hf_config["num_hidden_layers"]
    experts = (
        hf_config.get("num_experts") or hf_config.get("num_local_experts") or hf_config.get("n_routed_experts") or 0
    )
    mtp = mtp_layers(hf_config)
    names = set()
    for rule in mapping.rules:
        for L in range(layers if "{L}" in rule.megatron else 1):
            for M in range(mtp if "{M}" in rule.megatron else 1):
                for E in range(experts if rule.expert else 1):
                    names.update(h.format(L=L, E=E, M=M, T=layers + M) for h in rule.hf)
    names.update(c.format(T=layers + M) for c, _ in mapping.copies for M in range(mtp))
    return names


def check_no_unexpected(ckpt: HFCheckpoint, mapping: ArchMapping, hf_config: dict[str, Any]) -> None:
    extra = sorted(set(ckpt.names()) - allowed_hf_names(mapping, hf_config))
    if extra:
        raise UserError(
            f"{len(extra)} unexpected tensor(s) in {ckpt.dir} for {hf_config['architectures'][0]}, e.g. "
            f"{extra[0]!r} in {ckpt.info(extra[0]).file.name}: the checkpoint does not match its config.json."
        )


def load_hf_weights(chunks: list[Any], hf_dir: str | Path) -> None:
    """Copies this rank's shard of every parameter from an HF checkpoint. Each rank reads only the bytes of
    its own slices (whole rows for dim-0 splits), one tensor at a time."""
    from megatron.core.utils import unwrap_model

    from megatron_rl.models.hf_config import architecture_of, load_hf_config

    hf_config = load_hf_config(hf_dir)
    mapping = mapping_for(architecture_of(hf_config))
    ckpt = HFCheckpoint(hf_dir)
    check_no_unexpected(ckpt, mapping, hf_config)
    try:
        for chunk in chunks:
            model = unwrap_model(chunk)
            ctx = _context(model)
            for name, param in named_weights(model, mapping):
                rule, hf_names = _resolve(mapping, name, ctx, for_load=True)
                with torch.no_grad():
                    param.copy_(_read_shard(ckpt, rule, hf_names, name, tuple(param.shape), ctx))
    finally:
        ckpt.close()


def _read_shard(
    ckpt: HFCheckpoint, rule: Rule, hf_names: tuple[str, ...], name: str, shape: tuple[int, ...], ctx: dict
) -> torch.Tensor:
    rank, size, _ = _tp(rule.expert)
    infos = [ckpt.info(n) for n in hf_names]
    where = f"{ckpt.dir / infos[0].file.name}"
    try:
        pieces = hf_slices(rule.kind, [i.shape for i in infos], rank, size)
        parts = [ckpt.get(n, p) for n, p in zip(hf_names, pieces)]
        shard = assemble(rule.kind, parts, ctx["heads"], ctx["groups"], size)
    except (RuntimeError, IndexError) as exc:
        raise UserError(
            f"Tensor(s) {list(hf_names)} in {where} have shapes {[list(i.shape) for i in infos]} that do not "
            f"fit {name} ({exc})."
        ) from exc
    if tuple(shard.shape) != shape:
        raise UserError(
            f"Tensor {hf_names[0]!r} in {where} has shape {list(infos[0].shape)}, which gives "
            f"{list(shard.shape)} for {name} but the model expects {list(shape)}."
        )
    return shard


def _entries(chunks: list[Any], mapping: ArchMapping) -> list[dict[str, Any]]:
    """What this rank owns after the TP gather (tp/etp rank 0 of data-parallel replica 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    out = []
    for c, chunk in enumerate(chunks):
        model = unwrap_model(chunk)
        ctx = _context(model)
        for name, _ in named_weights(model, mapping):
            resolved = _resolve(mapping, name, ctx, for_load=False)
            if resolved is None:
                continue
            rule, hf_names = resolved
            tp_rank, _, group = _tp(rule.expert)
            dp_rank = ps.get_expert_data_parallel_rank() if rule.expert else ps.get_data_parallel_rank()
            owner = tp_rank == 0 and dp_rank == 0 and ps.get_context_parallel_rank() == 0
            out.append(
                {
                    "chunk": c,
                    "name": name,
                    "expert": rule.expert,
                    "kind": rule.kind,
                    "hf": hf_names,
                    "owner": owner,
                    "heads": ctx["heads"],
                    "groups": ctx["groups"],
                    "buffer": rule.buffer,
                }
            )
    return out


@dataclass(frozen=True)
class StageSenders:
    """Who sends what in a refit from a pipelined policy: each pipeline stage's tp=0/dp=0/cp=0 rank
    receives its stage's tensors (its TP peers' shards, its EP peers' experts) and streams them."""

    senders: tuple[int, ...]  # the global rank of each stage's sender, in stage order
    sender_of: tuple[int, ...]  # every global rank -> the sender of its stage

    def stage_of(self, rank: int) -> int:
        return self.senders.index(self.sender_of[rank])


def stage_senders() -> StageSenders:
    """Every rank must call it (one all-gather of each rank's pipeline stage)."""
    from megatron.core import parallel_state as ps

    lead = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    mine = (ps.get_pipeline_model_parallel_rank(), lead)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    first: dict[int, int] = {}
    for rank, (stage, is_lead) in enumerate(every):
        if is_lead:
            first.setdefault(stage, rank)
    return StageSenders(tuple(first[s] for s in sorted(first)), tuple(first[s] for s, _ in every))


def export_hf_weights(
    chunks: list[Any], *, grads: bool = False, stages: StageSenders | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (hf_name, full tensor) on global rank 0; every rank must iterate it (collectives inside).

    `grads=True` exports gradients (DDP's main_grad, else .grad) in the same HF names and layout; buffers
    and frozen (MTP) weights have none and are left out then.
    `stages` (stage_senders()): each pipeline stage's sender yields only its own stage's tensors (first
    stage: the embeddings; last: final norm and output layer, none with tied embeddings, whose one copy
    is the first stage's), so no rank ever holds the whole model.
    """
    from megatron.core.utils import unwrap_model

    model = unwrap_model(chunks[0])
    mapping = _mapping_from_model(model)
    mtp = 0 if grads else getattr(model, "mtp_layers", 0)
    for name, tensor in _export(chunks, mapping, grads, stages):
        yield name, tensor
        for copy in mapping.copies_of(name, model.config.num_layers, mtp):
            yield copy, tensor.clone()  # a file writer refuses two names over one storage


def _export(
    chunks: list[Any], mapping: ArchMapping, grads: bool, stages: StageSenders | None
) -> Iterator[tuple[str, torch.Tensor]]:
    from megatron.core.utils import unwrap_model

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = _entries(chunks, mapping)
    weights = [dict(named_weights(unwrap_model(c), mapping)) for c in chunks]
    if grads:  # buffers and frozen weights have no gradient
        mine = [e for e in mine if getattr(weights[e["chunk"]][e["name"]], "requires_grad", False)]
    params = {(e["chunk"], e["name"]): weights[e["chunk"]][e["name"]] for e in mine}
    if world > 1:
        every: list[Any] = [None] * world
        dist.all_gather_object(every, [(e["chunk"], e["name"], e["hf"], e["owner"], e["buffer"]) for e in mine])
    else:
        every = [[(e["chunk"], e["name"], e["hf"], e["owner"], e["buffer"]) for e in mine]]
    by_key = {(e["chunk"], e["name"]): e for e in mine}
    seen: set[tuple[str, ...]] = set()
    for src, listing in enumerate(every):
        for chunk_idx, name, hf_names, owner, buffer in listing:
            if not owner or tuple(hf_names) in seen:
                continue
            seen.add(tuple(hf_names))
            tensors = None
            entry = by_key.get((chunk_idx, name))
            # The owner's TP peers hold the other shards of the same (chunk, name).
            if entry is not None and _same_tp_group_as(src, entry["expert"]):
                tensors = _gather_tp(params[(chunk_idx, name)], entry, grads)
            dst = stages.sender_of[src] if stages is not None else 0
            if src == dst:
                if rank == dst:
                    yield from zip(hf_names, tensors)
                continue
            # Point-to-point to the receiver (rank 0, or the stage's sender: from other pipeline stages /
            # expert ranks), on the training device: NCCL only moves GPU tensors.
            dev = platform.device()
            for i, hf_name in enumerate(hf_names):
                if rank == src:
                    meta = torch.tensor(list(tensors[i].shape) + [-1] * (4 - tensors[i].dim()), device=dev)
                    dist.send(meta, dst=dst)
                    dist.send(tensors[i].to(dev).contiguous(), dst=dst)
                elif rank == dst:
                    meta = torch.empty(4, dtype=torch.long, device=dev)
                    dist.recv(meta, src=src)
                    shape = [int(x) for x in meta.tolist() if x >= 0]
                    dtype = torch.float32 if buffer else _export_dtype(chunks, grads)
                    buf = torch.empty(shape, dtype=dtype, device=dev)
                    dist.recv(buf, src=src)
                    yield hf_name, buf.cpu()


def _export_dtype(chunks: list[Any], grads: bool) -> torch.dtype:
    from megatron.core.utils import unwrap_model

    p = next(unwrap_model(chunks[0]).parameters())
    return (
        getattr(p, "main_grad", None).dtype
        if grads and getattr(p, "main_grad", None) is not None
        else p.dtype
    )


def _same_tp_group_as(src: int, expert: bool) -> bool:
    if not dist.is_initialized():
        return True
    _, _, group = _tp(expert)
    return src in dist.get_process_group_ranks(group)


def _gather_tp(param: torch.nn.Parameter, entry: dict[str, Any], grads: bool) -> list[torch.Tensor]:
    if grads:
        value = getattr(param, "main_grad", None)
        value = param.grad if value is None else value
    else:
        value = param.data
    value = value.detach()
    _, size, group = _tp(entry["expert"])
    if size > 1 and entry["kind"] != "replicated":
        shards = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(shards, value.contiguous(), group=group)
    else:
        shards = [value]
    out = []
    for t in to_hf(entry["kind"], shards, entry["heads"], entry["groups"]):
        t = t.cpu()
        if t.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
            t = t.clone()  # never hand out a view of a live parameter (or gradient) buffer
        out.append(t)
    return out


def _mapping_from_model(model: Any) -> ArchMapping:
    arch = getattr(model, "hf_architecture", None)
    if arch is None:
        raise UserError(
            "The model does not record its Hugging Face architecture; build it with "
            "megatron_rl.models.builder.build_model."
        )
    return mapping_for(arch)
