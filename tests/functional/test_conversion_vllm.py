"""vLLM serves what megatron-to-hf writes, as is (several safetensors files + index, config, tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from megatron_rl.models.tiny import save_tiny_checkpoint


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checkpoint_converters", *args], capture_output=True, text=True
    )


_VLLM = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
out = llm.generate([TokensPrompt(prompt_token_ids=[1, 40, 50, 60, 70])], SamplingParams(max_tokens=6, temperature=0, logprobs=0))
o = out[0].outputs[0]
print(json.dumps({"ids": list(o.token_ids), "lps": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]}))
"""


def test_vllm_serves_a_sharded_conversion_output(tmp_path):
    """megatron-to-hf output split over several safetensors files + index: vLLM loads it as is and its
    greedy tokens' logprobs are transformers' on the original model."""
    from transformers import AutoModelForCausalLM

    src = save_tiny_checkpoint(tmp_path / "tiny", "qwen2", attention_bias=True)
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert cli("hf-to-megatron", "--hf-dir", str(src), "--out", str(meg), "--no-progress").returncode == 0
    r = cli("megatron-to-hf", "--megatron-dir", str(meg), "--out", str(back), "--shard-gb", "0.0004")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (back / "model.safetensors.index.json").is_file() and len(list(back.glob("*.safetensors"))) >= 3
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _VLLM, str(back)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ids = torch.tensor([[1, 40, 50, 60, 70, *got["ids"]]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits[0]
    ref = torch.log_softmax(logits, -1)[4:-1].gather(-1, ids[0, 5:, None]).squeeze(-1)
    assert len(got["ids"]) == 6
    assert torch.allclose(torch.tensor(got["lps"]), ref, atol=1e-3), (got["lps"], ref)
    assert ids[0, 5:].tolist() == logits[4:-1].argmax(-1).tolist()  # greedy under transformers too
