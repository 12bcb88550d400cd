"""GRPO on a tiny random DeepSeek-V3 (conf=tiny_deepseek): MLA with YaRN, a dense first layer, MoE with shared
experts and sigmoid routing with its bias buffer, group-limited top-k, one frozen MTP layer. A TP=2 (+SP), EP=2
Megatron policy refits the vLLM engine (CPU MLA backend) every step; the engine's sampling probabilities must
be the policy's (fp32) and the run must finish with finite losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_tiny_deepseek_v3_grpo_run(tmp_path):
    cmd = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny_deepseek", f"run.dir={tmp_path}"]
    proc = subprocess.run([*cmd, "--in-process"], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 3
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in steps)
    # Step 1 samples from the checkpoint vLLM loaded; steps 2 and 3 from weights refitted out of the policy
    # (expert_bias included: a missing bias would move routing and this ratio).
    errors = [r["train/token_mult_prob_error"] for r in steps]
    assert all(1.0 <= e <= 1.001 for e in errors), errors
    # The final HF export keeps what RL does not train bit for bit (the MTP layer, the routers' bias) and
    # carries the trained weights; the MTP layer's embedding and head copies are the (trained) shared ones.
    start = load_file(str(tmp_path / "tiny_random" / "model.safetensors"))
    end = load_file(str(tmp_path / "hf_export" / "model.safetensors"))
    assert sorted(start) == sorted(end)
    copies = ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight")
    frozen = [
        n
        for n in start
        if (n.startswith("model.layers.3.") and n not in copies) or n.endswith("e_score_correction_bias")
    ]
    assert len(frozen) > 20 and all(torch.equal(start[n], end[n]) for n in frozen)
    assert torch.equal(end[copies[0]], end["model.embed_tokens.weight"])
    assert torch.equal(end[copies[1]], end["lm_head.weight"])
    assert not torch.equal(
        start["model.layers.1.self_attn.kv_b_proj.weight"], end["model.layers.1.self_attn.kv_b_proj.weight"]
    )
