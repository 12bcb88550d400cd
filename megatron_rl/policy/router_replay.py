"""MoE router replay on one rank: the engine's routing decisions, fed into Megatron's routers, and the
router-agreement count (docs/policy.md, "MoE router replay").

A micro-batch's `routing` field is [b, s-1, num_layers, top_k] expert ids (the engine's, per token and
decoder layer; generation/routing.py), -1 where the engine has no decision (the last token of a sequence,
padding): those tokens are routed by the trainer itself. Megatron's router sees its tokens as
[s_local, b] flattened (s-major); under sequence parallelism s_local is this TP rank's contiguous slice of
the padded sequence. Expert parallelism routes before the dispatch, on the rank's own tokens, so it needs
nothing. Pipeline stages own different layers: each router takes its layer (`layer_number`, global).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from megatron_rl.errors import UserError

ROUTER_REPLAY_MODES = ("off", "measure", "engine")


def check_usable(mode: str, hf: dict[str, Any], cp: int) -> None:
    """policy.router_replay other than off needs an MoE model, a megatron-core with RouterReplay, cp=1."""
    if mode == "off":
        return
    from megatron_rl.models import archs
    from megatron_rl.models.hf_config import architecture_of

    arch = architecture_of(hf)
    if not archs.get(arch).config(hf).get("num_moe_experts"):
        raise UserError(f"policy.router_replay={mode} needs a mixture-of-experts model; {arch} is dense.")
    if cp > 1:
        raise UserError(
            f"policy.router_replay={mode} does not support context parallelism (policy.parallel.cp={cp}): "
            "the replayed routing follows the token order of cp=1."
        )


class EngineRouterReplay:
    """One MoE layer's replay, in the slot megatron-core gives a router with `moe_enable_routing_replay`
    (`router.router_replay`, whose `get_replay_topk` computes the layer's top-k). Unlike megatron-core's
    own RouterReplay it (1) always keeps the router's own top-k, computed from this forward's scores before
    any replay, for the agreement metric; (2) replays per token: rows of -1 keep the router's own choice;
    (3) lives in no process-wide list (megatron-core's global list would mix the layers of two models built
    in one process)."""

    def __init__(self) -> None:
        self.target: torch.Tensor | None = None  # [tokens, k] engine expert ids, -1: the router's own
        self.replaying = False
        self.own: torch.Tensor | None = None  # the router's own top-k in the last forward

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.own = own.detach()
        target = self.target
        if not self.replaying or target is None:
            return probs, own
        target = target.to(device=scores.device, dtype=own.dtype)
        if target.shape != own.shape:
            raise RuntimeError(
                f"router replay: {tuple(target.shape)} replayed expert ids for a router that routes "
                f"{tuple(own.shape)} (tokens, top-k): the replayed routing does not follow the token layout"
            )
        chosen = torch.where(target >= 0, target, own)
        return scores.gather(1, chosen), chosen


def install(chunks: Iterable[Any]) -> list[list[tuple[int, EngineRouterReplay]]]:
    """Gives every MoE router of each model chunk an EngineRouterReplay; per chunk, (0-based global
    layer index, replay) pairs. The model must be built with `moe_enable_routing_replay=True`."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay

    per_chunk = []
    for chunk in chunks:
        routers = []
        # the decoder's layers only: multi-token-prediction layers are never run (models/builder.py)
        for module in getattr(chunk, "decoder", chunk).modules():
            if isinstance(module, TopKRouter):
                if getattr(module, "router_replay", None) is None:
                    raise RuntimeError(
                        "router replay: this megatron-core's router has no replay slot (built without "
                        "moe_enable_routing_replay, or megatron-core older than 0.16)"
                    )
                stock = module.router_replay
                if stock in RouterReplay.global_router_replay_instances:
                    RouterReplay.global_router_replay_instances.remove(stock)
                module.router_replay = EngineRouterReplay()
                routers.append((module.layer_number - 1, module.router_replay))
        per_chunk.append(routers)
    return per_chunk


def router_tokens(routing: torch.Tensor, width: int, layer: int, tp_rank: int, tp: int, sp: bool) -> torch.Tensor:
    """A micro-batch's [b, s-1, L, k] routing as one layer's router sees its tokens: [s_local * b, k], in
    Megatron's [s, b] order, padded with -1 to the forward's padded `width`, this TP rank's slice under SP."""
    b, s1, _, k = routing.shape
    ids = torch.full((b, width, k), -1, dtype=torch.long)
    ids[:, :s1] = routing[:, :, layer].long()
    ids = ids.transpose(0, 1)  # [s, b, k]
    if sp and tp > 1:
        ids = ids.chunk(tp, dim=0)[tp_rank]
    return ids.reshape(-1, k)


class ReplayState:
    """The rank's routers and what the last logprob forward agreed on."""

    def __init__(self, chunks: list[Any], mode: str, sequence_parallel: bool) -> None:
        self.routers = install(chunks)
        self.mode = mode
        self.sp = sequence_parallel
        self.counting = False
        self.agree = self.total = 0

    @property
    def moe(self) -> bool:
        return any(self.routers)

    def reset_counts(self, counting: bool) -> None:
        self.counting, self.agree, self.total = counting, 0, 0

    def before_forward(self, chunk_index: int, mb: dict[str, Any], width: int) -> list[torch.Tensor] | None:
        """Sets each router of the chunk up for this micro-batch; returns the engine's ids per router (None
        without engine routing in `mb`)."""
        from megatron.core import parallel_state

        routing = mb.get("routing")
        routers = self.routers[chunk_index]
        if routing is None or not routers:
            for _, replay in routers:
                replay.target, replay.replaying = None, False
            return None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        targets = []
        for layer, replay in routers:
            ids = router_tokens(routing, width, layer, tp_rank, tp, self.sp)
            targets.append(ids)
            replay.target, replay.replaying = ids, self.mode == "engine"
        return targets

    def after_forward(self, chunk_index: int, targets: list[torch.Tensor] | None) -> None:
        """Counts the token-layer decisions where the router's own top-k set equals the engine's (tokens the
        engine routed only; without SP every TP rank sees the same tokens, so TP rank 0 alone counts)."""
        from megatron.core import parallel_state

        routers = self.routers[chunk_index]
        for _, replay in routers:
            replay.target = None
        if targets is None or not self.counting:
            return
        if not self.sp and parallel_state.get_tensor_model_parallel_rank() != 0:
            return
        for (_, replay), engine in zip(routers, targets):
            own = replay.own
            known = (engine >= 0).all(-1)
            same = (own.sort(-1).values.cpu() == engine.sort(-1).values).all(-1)
            self.agree += int((same & known).sum())
            self.total += int(known.sum())


def collate_routing(seqs: list[dict[str, Any]]) -> torch.Tensor | None:
    """The micro-batch's `routing` [b, s-1, L, k] from its sequences' [len-1, L, k] fields, -1 past each
    sequence's end and for a sequence without one; None when none has routing."""
    given = [s.get("routing") for s in seqs]
    shape = next((r.shape[1:] for r in given if r is not None), None)
    if shape is None:
        return None
    width = max(len(s["ids"]) for s in seqs) - 1
    out = torch.full((len(seqs), width, *shape), -1, dtype=torch.int16)
    for i, (s, r) in enumerate(zip(seqs, given)):
        if r is None:
            continue
        if r.shape != (len(s["ids"]) - 1, *shape):
            raise ValueError(
                f"sequence {i}: routing has shape {tuple(r.shape)}, expected {(len(s['ids']) - 1, *shape)} "
                f"for {len(s['ids'])} tokens"
            )
        out[i, : len(r)] = r
    return out
