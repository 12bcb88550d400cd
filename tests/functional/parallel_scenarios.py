"""Scenarios run inside spawned gloo worlds (imported by the child processes, so no pytest here)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl import distributed, platform
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.checkpoint import load_checkpoint, save_checkpoint
from megatron_rl.policy.core import MegatronPolicy
from megatron_rl.policy.optim import OptimConfig


def fixed_batch(seed: int = 0, b: int = 2, s: int = 23, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (b, s), generator=g)


def nll_loss(logprobs: torch.Tensor, mb: dict[str, Any]):
    return -logprobs.sum(), logprobs.numel(), {"nll": -logprobs.mean().detach()}


def full_logits(policy: MegatronPolicy, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits gathered over TP on the last stage (tests only: the product never gathers)."""
    from megatron.core import tensor_parallel

    if policy.parallel.pp > 1:
        return None
    s = ids.shape[1]
    pad = (-s) % policy.pad_multiple
    padded = torch.nn.functional.pad(ids, (0, pad))
    pos = torch.arange(padded.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        out = policy.model[0](padded, pos, platform.attention_mask(padded.shape[1]))
    return tensor_parallel.gather_from_tensor_model_parallel_region(out)[:, :s].float()


def gathered_grads(policy: MegatronPolicy) -> dict[str, torch.Tensor]:
    """Every parameter's gradient in the TP=1 layout (tests only), gathered over the TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    grads = {}
    for name, p in policy.named_parameters():
        g = p.main_grad.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            if name.endswith("linear_fc1.weight"):
                # Each rank holds [gate_r; up_r]; the TP=1 tensor is [gate; up].
                halves = [part.chunk(2) for part in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
                g = torch.cat(parts, 0)
            else:
                g = torch.cat(parts, p.partition_dim)
        grads[name] = g
    return grads


def _policy(
    model_dir: str,
    par: ParallelConfig,
    ckpt: str | None,
    lr: float = 1e-3,
    sharded_optimizer: bool = True,
    clip_grad: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> MegatronPolicy:
    distributed.initialize(par, seed=1234)
    optim = OptimConfig(
        lr=lr, weight_decay=0.0, use_distributed_optimizer=sharded_optimizer, clip_grad=clip_grad
    )
    policy = MegatronPolicy(load_hf_config(model_dir), par, optim, dtype)
    if ckpt:
        load_checkpoint(policy, ckpt, with_optimizer=False)
    return policy


def dense_equivalence(rank: int, model_dir: str, work: str) -> dict[str, Any]:
    """world 2: TP1 (dp2) reference, then TP2+SP and PP2 on the same weights (via a torch_dist checkpoint)."""
    ids = fixed_batch()
    mbs = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    out: dict[str, Any] = {}

    # The distributed optimizer leaves each DP rank only its shard of the reduced gradient in main_grad,
    # so the reference that we read gradients from keeps whole gradients.
    ref = _policy(model_dir, ParallelConfig(), None, sharded_optimizer=False)
    save_checkpoint(ref, f"{work}/ref", with_optimizer=False)
    out["tp1_logits"] = full_logits(ref, ids)
    out["tp1_logprobs"] = torch.cat(ref.logprobs(mbs))
    # dp=2: each rank trains on the same two micro-batches, so the global loss equals the local one.
    out["tp1_step"] = ref.train_step(mbs, nll_loss)
    tp1_grads = gathered_grads(ref)

    tp2 = _policy(model_dir, ParallelConfig(tp=2, sequence_parallel=True), f"{work}/ref")
    out["tp2_logits"] = full_logits(tp2, ids)
    out["tp2_logprobs"] = torch.cat(tp2.logprobs(mbs))
    out["tp2_step"] = tp2.train_step(mbs, nll_loss)
    tp2_grads = gathered_grads(tp2)
    assert tp1_grads.keys() == tp2_grads.keys()
    out["grad_max_abs_diff"] = max((tp1_grads[k] - tp2_grads[k]).abs().max().item() for k in tp1_grads)
    out["grad_max_abs"] = max(g.abs().max().item() for g in tp1_grads.values())

    pp2 = _policy(model_dir, ParallelConfig(pp=2), f"{work}/ref")
    lp = pp2.logprobs(mbs)
    out["pp2_logprobs"] = torch.cat(lp) if lp is not None else None
    out["pp2_step"] = pp2.train_step(mbs, nll_loss)
    # A few more optimizer steps on the same batch must lower the loss.
    out["pp2_losses"] = [pp2.train_step(mbs, nll_loss)["loss"] for _ in range(4)]
    distributed.destroy_model_parallel()
    return out


# Megatron parameter -> the HF tensors it is made of, concatenated along dim 0 (layouts that need no
# interleaving: the gradient check below compares them directly).
HF_SAME_LAYOUT = {
    "embedding.word_embeddings.weight": ["model.embed_tokens.weight"],
    "decoder.final_layernorm.weight": ["model.norm.weight"],
    "decoder.layers.0.self_attention.linear_proj.weight": ["model.layers.0.self_attn.o_proj.weight"],
    "decoder.layers.1.mlp.linear_fc1.weight": [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ],
    "decoder.layers.1.mlp.linear_fc2.weight": ["model.layers.1.mlp.down_proj.weight"],
    "output_layer.weight": ["lm_head.weight"],
}


def train_step_grads(rank: int, model_dir: str) -> dict[str, Any]:
    """world 1: the gradients one train step accumulates in Megatron's main_grad buffers (mean NLL of
    fixed_batch), for the parameters in HF_SAME_LAYOUT that the model has; then the losses of three bf16
    steps (bf16 weights and activations, fp32 main_grad and master weights)."""
    # No clipping: it would scale main_grad in place during the step.
    policy = _policy(model_dir, ParallelConfig(), None, sharded_optimizer=False, clip_grad=0.0)
    policy.load_hf(model_dir)
    policy.train_step([{"input_ids": fixed_batch()}], nll_loss)
    # numpy: pickled by value (a tensor would travel as a shared-memory handle the exiting child closes)
    grads = {
        n: p.main_grad.detach().numpy().copy() for n, p in policy.named_parameters() if n in HF_SAME_LAYOUT
    }
    distributed.destroy_model_parallel()
    bf16 = _policy(model_dir, ParallelConfig(), None, dtype=torch.bfloat16)
    bf16.load_hf(model_dir)
    losses = [bf16.train_step([{"input_ids": fixed_batch()}], nll_loss)["loss"] for _ in range(3)]
    distributed.destroy_model_parallel()
    return {"grads": grads, "bf16_losses": losses}


def moe_equivalence(rank: int, model_dir: str, work: str) -> dict[str, Any]:
    """world 2: EP1 (dp2) vs EP2 and TP2+EP2+SP (etp=1) forward on the same weights."""
    ids = fixed_batch(seed=1)
    out: dict[str, Any] = {}
    ref = _policy(model_dir, ParallelConfig(), None)
    save_checkpoint(ref, f"{work}/moe_ref", with_optimizer=False)
    out["ep1_logits"] = full_logits(ref, ids)
    ep2 = _policy(model_dir, ParallelConfig(ep=2), f"{work}/moe_ref")
    out["ep2_logits"] = full_logits(ep2, ids)
    out["ep2_step"] = ep2.train_step([{"input_ids": ids}], nll_loss)
    tp2ep2 = _policy(model_dir, ParallelConfig(tp=2, ep=2, etp=1, sequence_parallel=True), f"{work}/moe_ref")
    out["tp2ep2_logits"] = full_logits(tp2ep2, ids)
    distributed.destroy_model_parallel()
    return out


def rendezvous_twice(rank: int) -> dict[str, Any]:
    """world 2: the spawner's store holds MASTER_PORT before any rank binds it, and the world forms there
    twice (torch.distributed torn down and started again, as a conversion does at each layout)."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as other:
        try:
            other.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
            held = False
        except OSError:
            held = True
    sums = []
    for value in (1.0, 10.0):
        distributed.initialize(ParallelConfig(), seed=0, timeout_s=60)
        total = torch.tensor([value * (rank + 1)])
        dist.all_reduce(total)
        sums.append(float(total))
        distributed.teardown()
    return {"held": held, "sums": sums}


def vocab_parallel_logprobs_check(rank: int) -> dict[str, float]:
    """world 2, tp=2: the policy's per-token logprob (minus Megatron's vocab-parallel cross entropy on
    each rank's vocab slice) and its gradient vs a plain full-vocab log_softmax."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    distributed.initialize(ParallelConfig(tp=2), seed=0)
    g = torch.Generator().manual_seed(7)
    full = (torch.randn(11, 3, 64, generator=g) * 4).requires_grad_(True)  # [s, b, V] as GPTModel has it
    target = torch.randint(0, 64, (11, 3), generator=g)
    weight = torch.randn(11, 3, generator=g)
    ref = torch.log_softmax(full, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    (ref * weight).sum().backward()
    shard = full.detach()[..., rank * 32 : (rank + 1) * 32].clone().requires_grad_(True)
    got = -vocab_parallel_cross_entropy(shard * 1.0, target)  # * 1.0: it works in place on its input
    (got * weight).sum().backward()
    distributed.destroy_model_parallel()
    return {
        "value_err": (got - ref).abs().max().item(),
        "grad_err": (shard.grad - full.grad[..., rank * 32 : (rank + 1) * 32]).abs().max().item(),
    }


def build_every_architecture(rank: int, model_dirs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """world 2: each architecture builds (TP2+SP, EP2 for MoE), runs forward/backward, finite grads."""
    out = {}
    for arch, path in model_dirs.items():
        moe = arch in ("qwen3_moe", "mixtral")
        par = ParallelConfig(tp=2, sequence_parallel=True, ep=2 if moe else 1, etp=1 if moe else None)
        policy = _policy(path, par, None)
        metrics = policy.train_step([{"input_ids": fixed_batch(b=2, s=16)}], nll_loss)
        names = [n for n, _ in policy.named_parameters()]
        out[arch] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "names": names}
    distributed.destroy_model_parallel()
    return out


def hf_roundtrip(rank: int, model_dirs: dict[str, str], layouts: dict[str, list[dict[str, Any]]]) -> dict:
    """For each arch and layout: load HF weights, compare logits with transformers (rank 0 compares),
    and export back to HF names (bit-exact round trip)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from checkpoint_converters import export_hf_weights, load_hf_weights

    out: dict[str, Any] = {}
    for arch, path in model_dirs.items():
        ids = fixed_batch(seed=3, b=2, s=20)
        with torch.no_grad():
            hf_logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
        original = load_file(f"{path}/model.safetensors")
        for layout in layouts[arch]:
            par = ParallelConfig(**layout)
            policy = _policy(path, par, None)
            load_hf_weights(policy.model, path)
            exported = dict(export_hf_weights(policy.model))
            key = f"{arch}:{layout}"
            res: dict[str, Any] = {}
            lp = policy.logprobs([{"input_ids": ids}])
            if lp is not None:
                ref = torch.log_softmax(hf_logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                res["logprob_err"] = (lp[0] - ref).abs().max().item()
            logits = full_logits(policy, ids)
            if logits is not None and rank == 0:
                res["logit_err"] = (logits - hf_logits).abs().max().item()
                res["top1_equal"] = bool((logits.argmax(-1) == hf_logits.argmax(-1)).all())
            if rank == 0:
                res["missing"] = sorted(set(original) - set(exported))
                res["extra"] = sorted(set(exported) - set(original))
                res["max_diff"] = max(
                    (original[k] - exported[k]).abs().max().item() for k in original if k in exported
                )
            out[key] = res
    distributed.destroy_model_parallel()
    return out


def optimizer_checkpoint_resume(rank: int, model_dir: str, work: str) -> dict[str, list[float]]:
    """world 2, dp=2 with the distributed optimizer: step, save (model + optimizer + LR), three more steps; a
    fresh policy that loads the checkpoint must take the identical three steps. A step's loss is computed
    before its update, so only the second and third losses see the restored Adam moments and step counts."""
    ids = fixed_batch(seed=5)
    mbs = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    first = _policy(model_dir, ParallelConfig(), None)
    first.train_step(mbs, nll_loss)
    save_checkpoint(first, f"{work}/resume")
    straight = [first.train_step(mbs, nll_loss)["loss"] for _ in range(3)]
    again = _policy(model_dir, ParallelConfig(), None)
    load_checkpoint(again, f"{work}/resume")
    resumed = [again.train_step(mbs, nll_loss)["loss"] for _ in range(3)]
    distributed.destroy_model_parallel()
    return {"straight": straight, "resumed": resumed}
