"""The supervised training loop shared by SFT and DPO: SPMD Megatron ranks, one small task per algorithm.

`launch(cfg, Task)` runs in the CLI process: run directory, starting model, a full check of the dataset
(bad lines fail here, naming file and line, before any rank starts), the resume decision, then the world.
`train_rank` is what every rank runs: build the policy from the HF weights, resume, then per step take the
global batch (identical on every rank), keep this rank's data-parallel shard, pack it into micro-batches by
token budget and train; validate every K steps; checkpoint; export HF weights at the end.

A task provides: `kind` ("sft"/"dpo": which loader), `title`, `rows` (rows per example, kept in one
micro-batch), `packing`, `batch_size`, `val_every`, `val_fraction`, `sum_keys` (loss metrics summed over
the batch), `bar_fields`, `loss_fn`, `prepare(micro_batches)` and `summarize(metrics)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import console, distributed, platform
from megatron_rl.dtypes import precision
from megatron_rl.training.batching import check_batch_size
from megatron_rl.training.checkpoints import CheckpointManager, capture_rng, restore_rng


@dataclass
class RankContext:
    rank: int
    world: int
    dp_rank: int
    dp_size: int
    model_dir: str
    hf_config: dict[str, Any]
    parallel: Any


def _on_device(mb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Micro-batch tensors where the logprobs are (the policy moves only input_ids to the GPU)."""
    return {k: v.to(device) if torch.is_tensor(v) and v.device != device else v for k, v in mb.items()}


def _tokenizer(cfg: Any, model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)


def launch(cfg: Any, task_cls: type) -> int:
    from omegaconf import OmegaConf

    from megatron_rl.config.schema import world_size
    from megatron_rl.models.starting_model import prepare_model
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.training.ranks import run_ranks
    from megatron_rl.training.run_dir import RunDir
    from megatron_rl.training.sources import load_examples

    world = world_size(cfg)
    dp = ParallelConfig(**OmegaConf.to_container(cfg.policy.parallel)).check_world(world)
    check_batch_size(cfg[task_cls.kind].batch_size, dp, f"{task_cls.kind}.batch_size")
    task_cls.check_config(cfg)
    run_dir = RunDir(cfg)
    console.use_run_dir(run_dir.path)
    resume = run_dir.should_resume()
    model_dir = prepare_model(cfg, run_dir.path)
    load_examples(cfg, _tokenizer(cfg, model_dir), task_cls.kind, task_cls.val_settings(cfg)[1])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run"]["dir"] = str(run_dir.path)  # ranks may start elsewhere (Ray actors on other nodes)
    run_ranks(
        train_rank,
        world,
        plain,
        model_dir,
        str(resume) if resume else None,
        task_cls,
        gpus_per_rank=1 if cfg.cluster.gpus_per_node else 0,
        cpus_per_rank=cfg.cluster.cpus_per_rank,
        log_name=task_cls.kind,
    )
    return 0


def train_rank(rank: int, cfg: Any, model_dir: str, resume: str | None, task_cls: type) -> list[dict] | None:
    """Runs the whole training on this rank; returns the logged metric rows on rank 0 (None elsewhere)."""
    from omegaconf import DictConfig, OmegaConf

    from megatron_rl.parallel import ParallelConfig

    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    parallel = ParallelConfig(**OmegaConf.to_container(cfg.policy.parallel))
    distributed.initialize(parallel, seed=cfg.run.seed)
    try:
        return _Trainer(rank, cfg, model_dir, parallel, task_cls).run(resume)
    finally:
        distributed.destroy_model_parallel()


class _Trainer:
    def __init__(self, rank: int, cfg: Any, model_dir: str, parallel: Any, task_cls: type) -> None:
        from megatron.core import parallel_state as ps

        from megatron_rl.models.hf_config import load_hf_config
        from megatron_rl.policy.core import MegatronPolicy
        from megatron_rl.training.batching import TrainOrder
        from megatron_rl.training.sources import load_examples

        self.cfg, self.rank = cfg, rank
        tokenizer = _tokenizer(cfg, model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        hf_config = load_hf_config(model_dir)
        self.policy = MegatronPolicy(hf_config, parallel, cfg.policy.optim, precision(cfg.model.dtype))
        self.policy.load_hf(model_dir)
        self.ctx = RankContext(
            rank=rank,
            world=dist.get_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            model_dir=model_dir,
            hf_config=hf_config,
            parallel=parallel,
        )
        self.task = task_cls(cfg, self.ctx)
        check_batch_size(self.task.batch_size, self.ctx.dp_size, f"{self.task.kind}.batch_size")
        self.examples = load_examples(cfg, tokenizer, self.task.kind, self.task.val_fraction)
        self.order = TrainOrder(self.examples.train, cfg.run.seed)
        self.val_rows = [row for i in self.examples.val for row in self.examples.get(i)]
        self.ckpts = CheckpointManager(Path(cfg.run.dir) / "checkpoints", cfg.run.keep_last)

    def _loss_fn(self, logprobs: torch.Tensor, mb: dict[str, Any]):
        return self.task.loss_fn(logprobs, _on_device(mb, logprobs.device))

    def _micro_batches(self, rows: list[dict[str, Any]], allow_empty: bool = False) -> list[dict[str, Any]]:
        """This data-parallel rank's share of `rows`, packed into micro-batches by token budget."""
        from megatron_rl.data.collate import collate_sequences
        from megatron_rl.training.batching import rank_micro_batches

        groups = rank_micro_batches(
            [len(r["ids"]) for r in rows],
            self.ctx.dp_size,
            self.ctx.dp_rank,
            self.cfg.policy.micro_batch_tokens,
            keep_together=self.task.rows,
            packing=self.task.packing,
            pad_multiple=self.policy.pad_multiple,
            allow_empty=allow_empty,
        )
        return [collate_sequences([rows[i] for i in g], self.pad_id) for g in groups]

    def _train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        rows = [row for i in self.order.take(self.task.batch_size) for row in self.examples.get(i)]
        mbs = self._micro_batches(rows)
        self.task.prepare(mbs)
        out = self.policy.train_step(mbs, self._loss_fn)
        metrics = {f"train/{k}": v for k, v in self.task.summarize(out).items()}
        elapsed = time.perf_counter() - start
        metrics.update(
            {
                "train/examples": float(len(rows) // self.task.rows),
                "train/trained_tokens": float(sum(r["mask"].sum().item() for r in rows)),
                "train/micro_batches": float(len(mbs)),
                "data/epoch": self.order.epoch,
                "timing/step_s": elapsed,
                "throughput/tokens_per_s": sum(len(r["ids"]) for r in rows) / elapsed,
                "memory/peak_gb": platform.peak_memory_gb(),
            }
        )
        return metrics

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Forward-only loss over the whole validation set (every DP rank takes its share)."""
        from megatron.core import parallel_state as ps

        if not hasattr(self, "_val_mbs"):
            self._val_mbs = self._micro_batches(self.val_rows, allow_empty=True)
            self.task.prepare(self._val_mbs)
        keys = list(self.task.sum_keys)
        local = torch.zeros(len(keys) + 2, dtype=torch.float64)
        if self._val_mbs:
            per_mb = self.policy.logprobs(self._val_mbs)
            # One rank per model replica contributes: tensor-parallel peers hold the same numbers.
            if per_mb is not None and ps.get_tensor_model_parallel_rank() == 0:
                for lp, mb in zip(per_mb, self._val_mbs):
                    loss_sum, count, m = self._loss_fn(lp, mb)
                    local[0] += float(loss_sum)
                    local[1] += float(count)
                    for i, k in enumerate(keys):
                        local[2 + i] += float(m[k])
        dist.all_reduce(local)
        out = {"loss": local[0].item() / max(local[1].item(), 1.0)}
        out.update({k: local[2 + i].item() for i, k in enumerate(keys)})
        return {f"val/{k}": v for k, v in self.task.summarize(out).items()}

    def _resume(self, ckpt: str) -> int:
        from megatron_rl.policy.checkpoint import load_checkpoint

        load_checkpoint(self.policy, Path(ckpt) / "policy")
        state = CheckpointManager.state(ckpt)
        self.order.load_state_dict(state["data"])
        if state.get("world") == self.ctx.world:
            restore_rng(ckpt, self.rank)
        return int(state["step"])

    def _save(self, step: int) -> None:
        from megatron_rl.policy.checkpoint import save_checkpoint

        self.ckpts.save(
            step,
            lambda d: save_checkpoint(self.policy, d),
            {"data": self.order.state_dict(), "world": self.ctx.world},
            rank=self.rank,
            barrier=dist.barrier,
            rng=capture_rng(),
        )

    def _export_hf(self) -> None:
        from checkpoint_converters import export_hf_weights
        from checkpoint_converters.hf_io import write_hf_checkpoint

        items = export_hf_weights(self.policy.model)
        if self.rank == 0:
            out = Path(self.cfg.run.dir) / "hf_export"
            write_hf_checkpoint(items, self.ctx.model_dir, out, overwrite=True)
        else:
            for _ in items:  # every rank takes part in the gathers
                pass

    def run(self, resume: str | None) -> list[dict] | None:
        from megatron_rl.progress import step_progress
        from megatron_rl.training.run_dir import RunDir

        cfg, task = self.cfg, self.task
        start = self._resume(resume) if resume else 0
        log = RunDir(cfg) if self.rank == 0 else None
        if log is not None:
            log.start_logging(start if resume else -1)
        rows: list[dict] = []

        def record(step: int, metrics: dict[str, float]) -> None:
            if log is not None:
                log.log(step, metrics)
                rows.append({"step": step, **metrics})

        val_every = task.val_every if self.val_rows else 0
        bar_on = log is not None
        try:
            # On the console this rank started with: its own output goes to its log (megatron_rl.console).
            terminal = console.terminal() if bar_on else None
            with step_progress(
                task.title, cfg.run.steps, start, task.bar_fields, console=terminal, enabled=bar_on
            ) as bar:
                if start == 0 and val_every:
                    record(0, self._validate())
                for step in range(start + 1, cfg.run.steps + 1):
                    metrics = self._train_step()
                    if val_every and (step % val_every == 0 or step == cfg.run.steps):
                        metrics.update(self._validate())
                    record(step, metrics)
                    bar.update(step, metrics)
                    every = cfg.run.checkpoint_every  # 0: only the final checkpoint
                    if (every and step % every == 0) or step == cfg.run.steps:
                        self._save(step)
            if cfg.run.export_hf_at_end:
                self._export_hf()
        finally:
            if log is not None:
                log.close()
        return rows if log is not None else None
