"""Tiny Hugging Face checkpoints built locally (no hub): tests, the CPU default recipe and benchmarks.

Heads are 32 wide because vLLM's CPU attention needs head_dim >= 32. The tokenizer is byte-level with no
merges, so any text round-trips and the vocabulary is small enough for a tiny model to learn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False},
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "use_sliding_window": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    # MLA sizes: vLLM's CPU MLA decode kernel is built for kv_lora_rank 512 + rope 64 only. Group-limited
    # routing (4 groups, 2 chosen) with top-4 of 8 experts keeps HF's top-2-per-group sum equal to Megatron's
    # top-(k / groups chosen) sum. YaRN is on so its scaling is exercised; one MTP layer is appended.
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 64,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "moe_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        # What DeepSeek's published config.json says (transformers implements only these; vLLM reads them).
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "rope_interleave": True,
        "num_nextn_predict_layers": 1,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}


def tiny_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """A config.json dict for a tiny model of `arch` (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral,
    deepseek_v3)."""
    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(_ARCH_DEFAULTS)}")
    cfg: dict[str, Any] = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 384,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    cfg.update(_ARCH_DEFAULTS[arch])
    if arch == "deepseek_v3":  # MLA's head sizes are its own fields
        del cfg["head_dim"]
    cfg.update(overrides)
    return cfg


def build_tokenizer(vocab_size: int = 384):
    """A byte-level tokenizer (256 byte tokens + chat specials) as a transformers fast tokenizer, padded with
    reserved special tokens to `vocab_size` so every id a model can sample decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(vocab))]
    for name in reserved:
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS + reserved)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_checkpoint(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Writes a randomly initialised tiny HF checkpoint (config, safetensors, tokenizer) to `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config(arch, **overrides)
    tokenizer = build_tokenizer()
    # eos is <|im_end|> so chat responses stop at the end of the assistant turn.
    cfg_dict["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_type = cfg_dict["model_type"]
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random norms (instead of ones) make conversion bugs that swap or drop norms visible.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's are zeros at init: make them matter
                b.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    if cfg_dict.get("num_nextn_predict_layers"):
        _append_mtp_layers(out, model, cfg_dict)
    tokenizer.save_pretrained(out)
    gen_cfg = out / "generation_config.json"
    if not gen_cfg.exists():
        gen_cfg.write_text(json.dumps({"eos_token_id": cfg_dict["eos_token_id"]}))
    return out


def _append_mtp_layers(out: Path, model: Any, cfg: dict[str, Any]) -> None:
    """DeepSeek-V3's multi-token-prediction layers as its published checkpoints store them (transformers has
    no module for them): `model.layers.{N + i}.*` = a full decoder layer of the last (MoE) layer's shape plus
    enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding and LM head."""
    from safetensors.torch import load_file, save_file

    file = out / "model.safetensors"
    tensors = load_file(str(file))
    n = cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(1000 + n)
    hidden = cfg["hidden_size"]
    last = f"model.layers.{n - 1}."
    for i in range(cfg["num_nextn_predict_layers"]):
        mtp = f"model.layers.{n + i}."
        for name, t in list(tensors.items()):
            if name.startswith(last):
                new = torch.empty_like(t)
                new.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.8 if "norm" in name else
                          torch.randn(t.shape, generator=g) * 0.02)
                if name.endswith("e_score_correction_bias"):
                    new = torch.randn(t.shape, generator=g) * 0.01
                tensors[mtp + name[len(last):]] = new
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"{mtp}{norm}.weight"] = torch.rand(hidden, generator=g) * 0.4 + 0.8
        tensors[f"{mtp}eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g) * 0.02
        tensors[f"{mtp}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"{mtp}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(file), metadata={"format": "pt"})
