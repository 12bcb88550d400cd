"""Continuous generation inside an engine's process, with weight updates that land between two engine steps.

`LLM.generate` owns the engine until its whole batch is done, so a refit would have to wait for the longest
response. Here requests are added at any time (`submit`) and a background thread advances the engine one
step (one token per running request) at a time under `lock`. A weight update takes that lock between two
steps, a token boundary, and holds it until the new weights are loaded (vllm_engine.VLLMEngine.begin_refit ..
end_refit); then the running requests are preempted and their KV recomputed with the new weights (vLLM's
`reset_prefix_cache(reset_running_requests=True)`), so every later token is sampled from the new policy over
the whole context. vLLM labels each step's tokens with the engine's weight version (`set_weight_version`);
finished outputs carry them as spans, expanded here to one version per token beside its logprob.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from megatron_rl.generation.base import Sample, SamplingSettings


def vllm_params(sampling: SamplingSettings, final_only: bool = False) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        logprobs=0,  # the sampled token's own logprob
        seed=sampling.seed,
    )
    if final_only:
        params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def to_samples(output: Any, version: int) -> list[Sample]:
    """A finished vLLM RequestOutput as Samples; `version` labels tokens vLLM reported no span for."""
    samples = []
    for c in output.outputs:
        ids = list(c.token_ids)
        lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
        per_token = [version] * len(ids)
        for span in getattr(c, "weight_versions", None) or []:
            if str(span.version).isdigit():  # vLLM's own label "default": never set, i.e. `version`
                per_token[span.start : span.end] = [int(span.version)] * (span.end - span.start)
        reason = "length" if c.finish_reason == "length" else "stop"
        oldest = min(per_token) if per_token else version
        samples.append(Sample(ids, lps, reason, c.text, oldest, token_versions=per_token))
    return samples


class StreamLoop:
    """One engine's continuous generation. `submit` and `poll` never wait for the engine (they run on the
    actor's thread, which must stay free to take a refit's calls while the loop is paused); the engine's
    weight updates call `pause` (returns once the current step ended) and `resume`."""

    def __init__(self, llm: Any, version: int) -> None:
        self.llm, self.engine = llm, llm.llm_engine
        self.lock = threading.Lock()  # the engine itself: one step, or a whole weight update
        # Cleared by `pause`: the loop stops taking `lock`. A Lock is not fair, and the loop would otherwise
        # take it again at once after each step, keeping a waiting update out for many tokens.
        self._may_step = threading.Event()
        self._may_step.set()
        self._mu = threading.Lock()  # the bookkeeping below, shared with the actor's thread
        self.version = version
        self.engine.set_weight_version(str(version))
        self._queue: list[tuple[str, list[int], Any]] = []  # submitted, not yet added to the engine
        self._done: dict[str, list[Sample]] = {}
        self._pending: set[str] = set()
        self._work = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._idle_s = 0.0
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-stream", daemon=True)
        self._thread.start()

    # Requests

    def submit(self, requests: list[tuple[str, list[int]]], sampling: SamplingSettings) -> None:
        """Adds requests (key, prompt ids), `sampling.n` samples each; `poll` returns them by key."""
        self._check()
        params = vllm_params(sampling, final_only=True)
        with self._mu:
            for key, prompt in requests:
                if key in self._pending or key in self._done:
                    raise ValueError(f"request {key!r} is already in flight")
                self._pending.add(key)
                self._queue.append((key, prompt, params))
        self._work.set()

    def poll(self, keys: set[str] | None = None) -> dict[str, Any]:
        """Finished requests (those of `keys`, or all) and the seconds the engine had nothing to generate
        since the last poll."""
        self._check()
        with self._mu:
            done = {k: self._done.pop(k) for k in [k for k in self._done if keys is None or k in keys]}
            idle, self._idle_s = self._idle_s, 0.0
            return {"done": done, "idle_s": idle, "in_flight": len(self._pending), "steps": self._steps}

    def wait_for(self, keys: list[str], timeout_s: float) -> dict[str, list[Sample]]:
        """Blocks until every key is finished (the loop's thread generates meanwhile)."""
        wanted, got = set(keys), {}
        deadline = time.monotonic() + timeout_s
        while wanted - got.keys():
            got |= self.poll(wanted - got.keys())["done"]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(wanted - got.keys())} request(s) unfinished after {timeout_s:.0f} s"
                )
            time.sleep(0.005)
        return got

    # Weight updates

    def pause(self) -> None:
        """Returns between two engine steps, holding the engine until `resume`."""
        self._may_step.clear()
        self.lock.acquire()

    def resume(self, version: int | None) -> None:
        """After an update to `version` (None: aborted): later tokens carry it, and the requests in flight
        recompute their KV with the new weights."""
        try:
            if version is not None:
                self.version = version
                self.engine.set_weight_version(str(version))
                self.llm.reset_prefix_cache(reset_running_requests=True)
        finally:
            self.lock.release()
            self._may_step.set()
            self._work.set()

    # The loop

    def _run(self) -> None:
        from vllm.inputs import TokensPrompt

        try:
            while not self._stop:
                self._may_step.wait()
                with self.lock:
                    with self._mu:
                        queued, self._queue = self._queue, []
                    for key, prompt, params in queued:
                        self.engine.add_request(key, TokensPrompt(prompt_token_ids=prompt), params)
                    busy = self.engine.has_unfinished_requests()
                    finished = [o for o in self.engine.step() if o.finished] if busy else []
                    with self._mu:
                        self._steps += busy
                        for out in finished:
                            if out.request_id in self._pending:
                                self._pending.discard(out.request_id)
                                self._done[out.request_id] = to_samples(out, self.version)
                        if not busy and self._pending and not self._queue:
                            raise RuntimeError(f"{len(self._pending)} request(s) vanished from the engine")
                if not busy:  # nothing to generate: wait for requests
                    t0 = time.monotonic()
                    self._work.wait(0.05)
                    self._work.clear()
                    with self._mu:
                        self._idle_s += time.monotonic() - t0
        except BaseException as exc:  # noqa: BLE001 - reported by the next submit/poll
            self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine's generation loop failed: {self._error!r}") from self._error

    def close(self) -> None:
        self._stop = True
        self._may_step.set()
        self._work.set()
        self._thread.join(timeout=10)
