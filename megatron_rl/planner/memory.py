"""Per-GPU memory formulas for a Megatron policy and a vLLM engine (pure arithmetic, no config, no torch).

Sources (see docs/recipes.md, "The planner", for the checks against their published figures):
- Weights, gradients and Adam state: Megatron Core's distributed-optimizer guide gives bytes per parameter
  of 18 (bf16 params, fp32 main grads) and 16 (fp32 params) without sharding, 6 + 12/d and 8 + 8/d with the
  distributed optimizer over d data-parallel ranks: params + grads stay whole, the fp32 master copy and the
  two Adam moments are sharded. The same split reproduces the ZeRO paper's figure 1 (Rajbhandari et al.
  2019: 7.5B params, 64 ranks, 120 GB -> 31.4 GB with fp16 grads and optimizer sharding).
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  section 4 and table 2: per layer s*b*h*(34 + 5*a*s/h) bytes for a GPT layer (4h GeLU MLP, dropout, bf16),
  sbh*(10 + 24/t + 5as/(ht)) with tensor parallelism, sbh*(34/t + 5as/(ht)) with sequence parallelism too,
  the 5as/h term dropped by selective recomputation, 2sbh per layer with full recomputation, and under
  1F1B pipelining the first stage holding p micro-batches of its L/p layers (times 1 + (p-1)/(p*v) with v
  interleaved chunks). `activation_bytes_per_token` derives the same terms tensor by tensor, so it also
  covers grouped-query attention, SwiGLU, no dropout, flash attention and top-k experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

GIB = 1024**3


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False
    experts: int = 0  # 0: dense
    top_k: int = 0
    moe_ffn: int = 0
    gated: bool = True  # SwiGLU (every supported family); False: GPT's GeLU MLP
    # DeepSeek-V3 style (megatron_rl/models/archs/deepseek_v3.py `planner`): shared experts' total ffn width,
    # the first layers dense, multi-token-prediction layers, and multi-latent attention (kv_lora_rank > 0).
    shared_ffn: int = 0
    dense_layers: int = 0
    mtp_layers: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_params(self) -> int:
        h, d = self.hidden, self.head_dim
        if self.mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.heads * qk) if self.q_lora_rank else h * self.heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv += self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.heads * self.v_head_dim * h
        return h * d * (self.heads + 2 * self.kv_heads) + self.heads * d * h

    @property
    def mlp_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.ffn

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def expert_params_per_layer(self) -> int:
        """Routed experts, averaged over every layer (dense first layers have none)."""
        return self.experts * 3 * self.hidden * self.moe_ffn * self.moe_layers // max(1, self.layers)

    @property
    def replicated_params_per_layer(self) -> int:
        """Kept whole on every tensor-parallel rank: two norms (and MLA's two LoRA norms), and the router of an
        MoE layer (averaged over every layer)."""
        mla_norms = self.q_lora_rank + self.kv_lora_rank
        router = self.hidden * self.experts * self.moe_layers // max(1, self.layers)
        return 2 * self.hidden + mla_norms + router

    @property
    def dense_params_per_layer(self) -> int:
        """Attention, dense MLP (dense layers) and shared experts (MoE layers), averaged over every layer."""
        dense_mlp = self.mlp_params * (self.layers - self.moe_layers) // max(1, self.layers)
        shared = 3 * self.hidden * self.shared_ffn * self.moe_layers // max(1, self.layers)
        return self.attention_params + dense_mlp + shared + self.replicated_params_per_layer

    @property
    def tp_split_params_per_layer(self) -> int:
        return self.dense_params_per_layer - self.replicated_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def mtp_params(self) -> int:
        """DeepSeek-V3's MTP layers: an MoE decoder layer each plus two norms, the projection and a norm."""
        if not self.mtp_layers:
            return 0
        h = self.hidden
        experts = (self.experts * self.moe_ffn + self.shared_ffn) * 3 * h + h * self.experts
        layer = self.attention_params + experts + 2 * h + self.q_lora_rank + self.kv_lora_rank
        return self.mtp_layers * (layer + 3 * h + 2 * h * h)

    def total_params(self) -> int:
        """The decoder's parameters (MTP layers excluded: the engine does not load them, the trainer keeps them
        frozen; `mtp_params` counts them)."""
        per_layer = self.dense_params_per_layer + self.expert_params_per_layer
        return self.layers * per_layer + self.embedding_params * (1 if self.tied else 2) + self.hidden

    def active_params(self) -> int:
        """Parameters one token passes through (top-k of the experts)."""
        experts = self.top_k * 3 * self.hidden * self.moe_ffn * self.moe_layers // max(1, self.layers)
        per_layer = self.dense_params_per_layer + experts
        return self.layers * per_layer + self.embedding_params * (1 if self.tied else 2) + self.hidden


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sp: bool = False
    vpp: int = 1
    first_layers: int = 0  # uneven pipeline: the first/last stage's layers (0: an even split)
    last_layers: int = 0

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same expert shard: Megatron folds ep x etp into the tp*cp*dp ranks of a stage."""
        return max(1, self.tp * self.cp * self.dp // (self.ep * self.etp))


def state_bytes_per_param(
    param_bytes: float, grad_bytes: float, optimizer_bytes: float, dp: int, distributed: bool
) -> float:
    """Weights + gradients stay whole on every rank; the optimizer's bytes are split over dp when sharded."""
    return param_bytes + grad_bytes + optimizer_bytes / (dp if distributed else 1)


def mixed_precision_bytes(dtype: str) -> tuple[int, int, int]:
    """(param, main grad, optimizer) bytes per parameter in Megatron with Adam and fp32 grad reduction:
    bf16 params keep an fp32 master copy next to Adam's two fp32 moments (4 + 4 + 4); fp32 params are their
    own master, leaving the two moments (4 + 4)."""
    return (2, 4, 12) if dtype == "bf16" else (4, 4, 8)


def activation_bytes_per_token(
    arch: Arch,
    tp: int,
    sp: bool,
    recompute: str,
    seq_len: int,
    *,
    cp: int = 1,
    etp: int = 1,
    flash_attention: bool = True,
    dropout: bool = False,
    elt: int = 2,
) -> float:
    """Bytes one layer keeps for backward, per token of the micro-batch (Korthikanti et al. 2022, sec. 4.1).

    With elt=2, dropout, a 4h GeLU MLP, MHA and stored attention scores, this is exactly 34 + 5as/h times h
    (per token, t=1), and the table-2 variants for tensor, sequence parallelism and selective recompute.
    """
    h, a, d = arch.hidden, arch.heads, arch.head_dim
    kv = arch.kv_heads
    seq_split = tp if sp else 1  # sequence parallelism splits what tensor parallelism leaves whole
    if recompute == "full":
        return elt * h / seq_split  # the layer input only; the rest is recomputed (paper: 2sbh)
    mask = 1 if dropout else 0  # dropout masks are one byte per element
    # Whole tensors (sequence-split under SP): two norm inputs, QKV input, MLP input, two dropout masks.
    whole = 2 * elt * h + elt * h + elt * h + 2 * mask * h
    # Tensor-split tensors: Q, K, V, the output projection's input.
    split = elt * a * d + 2 * elt * kv * d + elt * a * d
    if arch.mla:  # per-head q/k of nope + rope dims, v of its own; the gathered latents and their norms whole
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        split = elt * a * (2 * qk + 2 * arch.v_head_dim)
        whole += elt * (2 * arch.q_lora_rank + 2 * arch.kv_lora_rank + arch.qk_rope_head_dim)
    if arch.experts:  # every layer counted as MoE: the larger of the two for DeepSeek-V3's dense first layers
        whole -= elt * h  # the MoE layer input is counted with the routed copies below
        # Each of the top-k copies: its permuted input, fc1 output (gate+up), activation output, and its
        # fc2 output (needed for the routing weights' gradient). Balanced routing gives every rank
        # top_k * tokens/tp copies; etp ranks share an expert, each seeing all its tokens.
        routed = arch.top_k * (2 * elt * h * etp + 3 * elt * arch.moe_ffn) / tp
        router = 4 * arch.experts / seq_split  # fp32 router logits
        shared = 3 * elt * arch.shared_ffn / tp  # shared experts: a dense SwiGLU MLP beside the routed ones
        mlp = routed + router + shared
    else:
        act = (2 * elt * arch.ffn + elt * arch.ffn) if arch.gated else (elt * arch.ffn + elt * arch.ffn)
        mlp = act / tp
    scores = 0.0
    if recompute == "none" and not flash_attention:
        # softmax output, its dropout mask and dropout output: (2 + 1 + 2) bytes * a * s per token.
        scores = (elt + mask + (elt if dropout else 0)) * a * (seq_len / cp) / tp
    return (whole / seq_split + split / tp + mlp + scores) / cp


def inflight_microbatches(pp: int, vpp: int = 1) -> float:
    """Micro-batches whose activations the first pipeline stage holds at the 1F1B peak."""
    if pp == 1:
        return 1.0
    return pp * (1 + (pp - 1) / (pp * vpp)) if vpp > 1 else float(pp)


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    name: str
    params: float
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations + self.logits


def training_stages(
    arch: Arch,
    lay: Layout,
    dtype: str,
    distributed_optimizer: bool,
    micro_batch_tokens: int,
    seq_len: int,
    recompute: str,
    flash_attention: bool = True,
) -> list[StageMemory]:
    """The first and (when pp > 1) last pipeline stage: the first holds the embedding and the most
    micro-batches in flight, the last the LM head and the logits."""
    pb, gb, ob = mixed_precision_bytes(dtype)
    dense_per_layer = arch.tp_split_params_per_layer / lay.tp + arch.replicated_params_per_layer
    experts_per_layer = arch.expert_params_per_layer / (lay.ep * lay.etp)
    vocab = arch.embedding_params / lay.tp
    elt = pb  # activations are kept in the parameters' dtype
    per_token = activation_bytes_per_token(
        arch,
        lay.tp,
        lay.sp,
        recompute,
        seq_len,
        cp=lay.cp,
        etp=lay.etp,
        flash_attention=flash_attention,
        elt=elt,
    )
    rebuilt = 0.0
    if recompute == "full":  # backward rebuilds one layer's activations at a time
        rebuilt = micro_batch_tokens * activation_bytes_per_token(
            arch, lay.tp, lay.sp, "selective", seq_len, cp=lay.cp, etp=lay.etp, elt=elt
        )
    # Log-probs: the logits in the model's dtype, their fp32 vocab-parallel log-softmax and its gradient.
    logits = micro_batch_tokens / lay.cp * arch.vocab / lay.tp * (elt + 8)
    dense_dp = lay.dp * lay.cp  # the distributed optimizer shards over data x context parallel ranks

    def stage(name: str, layers: float, embeddings: int, inflight: float, with_logits: bool) -> StageMemory:
        d = layers * dense_per_layer + embeddings * vocab
        experts = layers * experts_per_layer
        per_mb = per_token * micro_batch_tokens * layers + rebuilt
        return StageMemory(
            name=name,
            params=d + experts,
            weights=(d + experts) * pb,
            grads=(d + experts) * gb,
            optimizer=ob
            * (
                d / (dense_dp if distributed_optimizer else 1)
                + experts / (lay.expert_dp if distributed_optimizer else 1)
            ),
            activations=per_mb * inflight,
            logits=logits if with_logits else 0.0,
        )

    if lay.pp == 1:
        return [stage("only stage", arch.layers, 1 if arch.tied else 2, 1.0, True)]
    even = arch.layers / lay.pp
    if not (lay.first_layers or lay.last_layers):
        return [
            stage("first stage", even, 1, inflight_microbatches(lay.pp, lay.vpp), False),
            stage("last stage", even, 1, 1.0, True),
        ]
    # Uneven: the middle stages split what the first and last leave; the second stage holds nearly as many
    # micro-batches in flight as the first (counted the same: an upper bound).
    first, last = lay.first_layers or None, lay.last_layers or None
    middle = (arch.layers - (first or 0) - (last or 0)) / (lay.pp - (first is not None) - (last is not None))
    inflight = inflight_microbatches(lay.pp, lay.vpp)
    return [
        stage("first stage", first or middle, 1, inflight, False),
        stage("middle stage", middle, 0, inflight, False),
        stage("last stage", last or middle, 1, 1.0, True),
    ]


def resident_during_generation(stage: StageMemory, offload: str) -> float:
    """Megatron's bytes left on a GPU while colocated engines generate: its weights always (the refit reads
    them), less what policy.offload_during_generation frees (policy/offload.py: the optimizer's state and
    fp32 main copy; with "optimizer_and_grads" the gradient buffers too)."""
    freed = {"none": 0.0, "optimizer": stage.optimizer, "optimizer_and_grads": stage.optimizer + stage.grads}
    return stage.static - freed[offload]


def kv_bytes_per_token(arch: Arch, tp: int, elt: int = 2, pp: int = 1) -> float:
    """K and V of every layer for one token on one GPU (the fullest of `pp` pipeline stages); vLLM replicates
    KV heads when tp exceeds them. MLA caches one latent (kv_lora_rank + rope dims) per layer, whole on every
    tensor-parallel rank."""
    layers = ceil(arch.layers / pp)
    if arch.mla:
        return layers * (arch.kv_lora_rank + arch.qk_rope_head_dim) * elt
    return 2 * layers * ceil(arch.kv_heads / tp) * arch.head_dim * elt


def vllm_weight_bytes(arch: Arch, tp: int, elt: int = 2) -> float:
    return arch.total_params() * elt / tp
