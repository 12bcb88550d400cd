"""Router replay inside a spawned gloo world (imported by the child processes, so no pytest here).

The routing the trainer really used is read from each MoE router's own output (its routing map, the
experts the dispatcher sends each token to) through forward hooks, and laid back onto (sequence, position)
here, independently of megatron_rl.policy.router_replay's slicing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import distributed
from megatron_rl.grpo.policy_worker import micro_batches
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.core import MegatronPolicy
from megatron_rl.policy.optim import OptimConfig


def _routing_maps(policy: MegatronPolicy) -> tuple[list[Any], dict[int, list[torch.Tensor]]]:
    """Hooks on every router of the rank's model: layer index -> its routing maps, one per forward."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.utils import unwrap_model

    seen: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for module in unwrap_model(policy.model[0]).decoder.modules():  # MTP layers never run
        if isinstance(module, TopKRouter):
            layer = module.layer_number - 1
            seen[layer] = []
            hooks.append(module.register_forward_hook(lambda m, i, out, lay=layer: seen[lay].append(out[1])))
    return hooks, seen


def _decisions(policy: MegatronPolicy, mbs: list[dict], maps: dict[int, list[torch.Tensor]], seqs) -> dict:
    """Compares, for each token the engine routed and each MoE layer, the trainer's expert set with the
    engine's: {"agree": n, "total": n}. The routing maps are this TP rank's [s/tp * b, E] slice under
    sequence parallelism: gathered over TP, then [s, b] (Megatron's order) back to [b, s]."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    agree = total = 0
    for layer, per_mb in maps.items():
        assert len(per_mb) == len(mbs), (layer, len(per_mb), len(mbs))
        for mb, local in zip(mbs, per_mb):
            local = local.contiguous()
            if policy.parallel.sequence_parallel and tp > 1:
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(parts, local, group=group)
                local = torch.cat(parts)
            b = mb["input_ids"].shape[0]
            full = local.view(-1, b, local.shape[-1]).transpose(0, 1)  # [b, s_padded, E]
            for row, i in enumerate(mb["index"].tolist()):
                engine = seqs[i]["routing"][:, layer].long()  # [len-1, k]
                mine = full[row, : len(engine)]
                expected = torch.zeros_like(mine).scatter(1, engine, True)
                same = (mine == expected).all(-1)
                agree += int(same.sum())
                total += len(same)
    return {"agree": agree, "total": total}


def nll(logprobs: torch.Tensor, mb: dict[str, Any]):
    mask = mb["mask"]
    return -(logprobs * mask).sum(), mask.sum(), {}


def replay_check(rank: int, model_dir: str, seqs: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """world 2, TP=2 + SP + EP=2 (etp=1): logprobs without replay ("measure") and with it ("engine"), then
    a train step with it; per phase the trainer's own agreement counts and this module's independent ones."""
    par = ParallelConfig(tp=2, ep=2, etp=1, sequence_parallel=True)
    distributed.initialize(par, seed=1234)
    optim = OptimConfig(lr=1e-4, weight_decay=0.0, use_distributed_optimizer=False)
    policy = MegatronPolicy(load_hf_config(model_dir), par, optim, router_replay="measure")
    policy.load_hf(model_dir)
    mbs = micro_batches(seqs, budget)
    hooks, maps = _routing_maps(policy)
    out: dict[str, Any] = {"micro_batches": len(mbs), "padded": any(
        int(mb["lengths"].min()) < mb["input_ids"].shape[1] for mb in mbs
    )}

    def per_sequence(per_mb: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if per_mb is None:
            return None
        lps: list[torch.Tensor | None] = [None] * len(seqs)
        for mb, lp in zip(mbs, per_mb):
            for row, i in enumerate(mb["index"].tolist()):
                lps[i] = lp[row, : len(seqs[i]["ids"]) - 1].clone()
        return lps

    for phase in ("measure", "engine"):
        policy.replay.mode = phase
        for layer in maps:
            maps[layer].clear()
        out[f"{phase}_logprobs"] = per_sequence(policy.logprobs(mbs))
        out[f"{phase}_counts"] = {"agree": policy.replay.agree, "total": policy.replay.total}
        out[f"{phase}_independent"] = _decisions(policy, mbs, maps, seqs)
    for layer in maps:
        maps[layer].clear()
    policy.train_step(mbs, nll)
    out["train_independent"] = _decisions(policy, mbs, maps, seqs)
    for h in hooks:
        h.remove()
    out["moe_layers"] = sorted(maps)
    distributed.destroy_model_parallel()
    return out
