"""The experts a vLLM engine routed each token to, per MoE layer: what router replay and the
router-agreement metric read (docs/policy.md, "MoE router replay").

One array per sample: [prompt + response - 1, num_hidden_layers, top_k] expert ids, row t the token at
position t (the last response token is sampled but never run through the model, so it has no row), dense
layers' rows zero. That is the layout of vLLM's own `routed_experts` output, which an engine on vLLM's
model runner V2 (GPU) returns natively. The V1 runner (the CPU backend: V2 needs Triton) has no such output,
so `install_capture` hooks the routers of the worker's model instead: every forward's top-k ids are filed
under (request, position) and `take_captured` hands them over after a `generate`. Prefix caching is off
then (a prompt served from cache is never routed again).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_STATE = "_megatron_rl_routing"


def install_capture(worker: Any) -> int:
    """(collective_rpc) Hooks every MoE router of the worker's model and its model runner's forward.
    Returns the number of hooked MoE layers."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    runner = worker.model_runner
    if getattr(runner, _STATE, None) is not None:
        return len(getattr(runner, _STATE)["layers"])
    state: dict[str, Any] = {"step": {}, "records": {}, "layers": []}
    for module in runner.get_model().modules():
        if isinstance(module, MoERunner) and isinstance(module.router, BaseRouter):
            layer = module.layer_id
            module.router.set_capture_fn(lambda ids, layer=layer: state["step"].__setitem__(layer, ids))
            state["layers"].append(layer)
    if not state["layers"]:
        raise ValueError("routed-experts capture: the engine's model has no MoE router to hook")
    forward = runner._model_forward

    def capturing_forward(*args: Any, **kwargs: Any) -> Any:
        state["step"].clear()
        out = forward(*args, **kwargs)
        _file_step(runner, state, kwargs.get("positions", args[1] if len(args) > 1 else None))
        return out

    runner._model_forward = capturing_forward
    setattr(runner, _STATE, state)
    return len(state["layers"])


def _file_step(runner: Any, state: dict[str, Any], positions: torch.Tensor | None) -> None:
    """Splits one forward's rows by request (the runner lays requests out contiguously, in input-batch
    order, `query_start_loc` apart) and files them under each request's token positions."""
    if not state["step"] or positions is None:
        return  # a dummy or profiling run
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[: num_reqs + 1].copy()
    # copies: on CPU .numpy() would share the runner's persistent buffers, which the next step overwrites
    pos = positions[: starts[-1]].cpu().numpy().copy()
    layers = sorted(state["step"])
    rows = {layer: state["step"][layer][: starts[-1]].cpu().numpy().copy() for layer in layers}
    for r, req_id in enumerate(batch.req_ids[:num_reqs]):
        lo, hi = int(starts[r]), int(starts[r + 1])
        if hi > lo:
            ids = np.stack([rows[layer][lo:hi] for layer in layers], axis=1)  # [n, moe layers, k]
            state["records"].setdefault(req_id, []).append((pos[lo:hi], ids))
    state["step"].clear()


def take_captured(worker: Any) -> dict[str, Any]:
    """(collective_rpc) The routing filed since the last call, per vLLM request id, and forgets it:
    {"layers": [MoE layer index...], "requests": {request_id: (positions [n], ids [n, moe layers, k])}}."""
    state = getattr(worker.model_runner, _STATE, None)
    if state is None:
        return {"layers": [], "requests": {}}
    requests = {}
    for req_id, chunks in state["records"].items():
        requests[req_id] = (np.concatenate([p for p, _ in chunks]), np.concatenate([i for _, i in chunks]))
    state["records"] = {}
    return {"layers": list(state["layers"]), "requests": requests}


def request_key(vllm_request_id: str) -> tuple[str, int]:
    """(the caller's request id, sample index) of a vLLM engine-core request id: vLLM suffixes the caller's
    id with "-<8 random characters>" and names the n > 1 samples of a request "<index>_<id>"."""
    base = vllm_request_id.rsplit("-", 1)[0]
    index, sep, parent = base.partition("_")
    return (parent, int(index)) if sep and index.isdigit() else (base, 0)


def assemble(
    positions: np.ndarray, ids: np.ndarray, layers: list[int], num_layers: int, length: int
) -> torch.Tensor:
    """One sample's routing [length, num_layers, k] from captured (position, ids) rows; a position captured
    twice (a preempted request recomputed) keeps its latest rows. A position never captured raises."""
    k = ids.shape[-1]
    out = torch.zeros((length, num_layers, k), dtype=torch.int16)
    seen = np.zeros(length, dtype=bool)
    keep = positions < length
    rows = torch.from_numpy(ids[keep].astype(np.int16))
    at = torch.from_numpy(positions[keep].astype(np.int64))
    out[at.unsqueeze(1), torch.tensor(layers).unsqueeze(0)] = rows
    seen[positions[keep]] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise RuntimeError(f"routed-experts capture missed {missing} of {length} token position(s)")
    return out


def native(routed_experts: np.ndarray | None, length: int) -> torch.Tensor | None:
    """vLLM's own `routed_experts` output (runner V2) cut to the sample's `length` positions; positions it
    lacks get -1 (the trainer routes those tokens itself)."""
    if routed_experts is None:
        return None
    got = torch.from_numpy(np.asarray(routed_experts[:length]).astype(np.int16))
    if len(got) == length:
        return got
    return torch.cat([got, torch.full((length - len(got), *got.shape[1:]), -1, dtype=torch.int16)])
