"""The GRPO controller: one process drives Megatron policy ranks and a group of vLLM engines through Ray."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any

from megatron_rl import console
from megatron_rl.algorithms.registry import get_advantage
from megatron_rl.colocation import TimeShare
from megatron_rl.config.schema import world_size
from megatron_rl.data.prompts import build_prompt_splits
from megatron_rl.environments.base import make_environment
from megatron_rl.faults.recovery import Faults, Workers
from megatron_rl.generation.base import token_mult_prob_error
from megatron_rl.grpo import rollout
from megatron_rl.grpo.async_rollouts import make_rollout_source
from megatron_rl.grpo.episodes import episode_setup
from megatron_rl.grpo.setup import build_engine, build_policy, derive_num_engines
from megatron_rl.models.starting_model import prepare_model
from megatron_rl.progress import BARS, step_progress
from megatron_rl.ray_utils import init_ray
from megatron_rl.training.run_dir import RunDir


class Timer(dict):
    """Seconds per phase of step `step`; each phase but the whole step also runs under its hang deadline."""

    def __init__(self, faults: Faults | None = None, step: int = 0) -> None:
        super().__init__()
        self.faults, self.step = faults, step

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        watched = self.faults is not None and phase != "step"
        with self.faults.phase(phase, self.step) if watched else nullcontext():
            yield
        self[f"timing/{phase}_s"] = time.perf_counter() - start


def run(cfg: Any) -> int:
    from transformers import AutoTokenizer

    run_dir = RunDir(cfg)
    console.use_run_dir(run_dir.path)  # before Ray starts: its workers inherit where their logs go
    ranks = world_size(cfg) + (derive_num_engines(cfg) if not cfg.cluster.gpus_per_node else 0)
    init_ray(num_cpus=max(2, math.ceil(ranks * cfg.cluster.cpus_per_rank) + 1))
    faults = Faults(cfg, run_dir.path)  # from here SIGTERM/SIGUSR1 mean: checkpoint, stop, requeue
    model_dir = prepare_model(cfg, run_dir.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    data, eval_items = build_prompt_splits(cfg, tokenizer)  # evaluation prompts are never trained on
    env, advantage = make_environment(cfg.env.name, **cfg.env.kwargs), get_advantage(cfg.grpo.advantage)
    episodes = episode_setup(cfg, tokenizer)  # None unless multi-turn (env.max_turns > 1)
    g = cfg.grpo
    loss_settings = {
        k: g[k]
        for k in ("clip_low", "clip_high", "dual_clip", "loss_agg", "kl_coef", "kl_estimator", "tis_cap")
    }
    fresh_data = data.state_dict()  # where a restart before the first checkpoint starts again

    def attempt(faults: Faults, workers: Workers) -> int:
        """Start the workers, resume from the latest checkpoint, train the remaining steps (again after a
        restart: megatron_rl.faults)."""
        policy = workers.add_policy(build_policy(cfg, model_dir))
        # Colocated on GPU: engines sleep while the policy trains, the policy's optimizer state leaves the
        # GPU while the engines generate, from before they start (megatron_rl/colocation.py; else a no-op).
        share = TimeShare(cfg, policy)
        engine = workers.add_engine(
            build_engine(cfg, model_dir, policy.placement_group, policy.bundle_of_rank)
        )
        share.use(engine)
        # The step's batch: generated now (synchronous), or taken from what the engines generated meanwhile
        # (grpo.max_staleness > 0, a separate generation pool).
        rollouts = workers.closing(
            make_rollout_source(cfg, engine, data, env, advantage, run_dir.path, episodes=episodes)
        )
        start = 0
        ckpt = run_dir.latest_checkpoint() if faults.restarts else run_dir.should_resume()
        if ckpt is None:
            data.load_state_dict(fresh_data)
        else:
            policy.load(str(ckpt / "policy"))
            state = RunDir.trainer_state(ckpt)
            start = state["step"]
            engine.refit_from(policy, version=start)
            rollouts.load_state_dict(state)
        run_dir.start_logging(start if ckpt is not None else -1)
        faults.resumed(start)
        title, fields = BARS["grpo"]
        with step_progress(title, cfg.run.steps, start, fields) as bar:
            if start == 0 and cfg.run.eval_every:
                evaluation = rollout.evaluate(
                    engine, eval_items, env, cfg.generation, cfg.run.eval_samples, episodes=episodes
                )
                run_dir.log(0, {**evaluation, **engine.step_metrics()})
            for step in range(start + 1, cfg.run.steps + 1):
                t = Timer(faults, step)
                with t("step"):
                    with t("generate"):
                        batch, metrics = rollouts.next_batch(step)
                    seqs = batch.sequences(mask_truncated=g.overlong_filter)
                    if seqs:
                        share.before_training(metrics)
                        with t("logprobs"):
                            for seq, lp in zip(seqs, policy.logprobs(seqs)):
                                seq["old_lp"] = lp
                            if g.kl_coef:
                                for seq, lp in zip(seqs, policy.logprobs(seqs, reference=True)):
                                    seq["ref_lp"] = lp
                        metrics["train/token_mult_prob_error"] = _mismatch(seqs)
                        replay = cfg.policy.router_replay != "off"
                        if replay and (agree := policy.router_agreement()) is not None:
                            metrics["train/router_agreement"] = agree  # before any replay (docs/policy.md)
                        with t("train"):
                            train = policy.train(seqs, g.loss, loss_settings)
                        metrics.update(
                            {k if k.startswith("memory/") else f"train/{k}": v for k, v in train.items()}
                        )
                        share.before_refit(metrics)
                        with t("refit"):
                            refit = engine.refit_from(policy, version=step)
                        share.after_refit(metrics)
                        rollouts.weights_updated(step)
                        metrics["refit/gb_per_s"] = refit["gb_per_s"]
                        # the engine's share (receive + load into its kernels); the rest is export + transport
                        engine_s = refit.get("receive_s", 0.0) + refit.get("load_s", 0.0)
                        metrics["refit/engine_load_s"] = engine_s
                metrics.update(t)
                metrics["throughput/tokens_per_s"] = sum(len(s["ids"]) for s in seqs) / t["timing/step_s"]
                if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                    metrics.update(
                        rollout.evaluate(
                            engine, eval_items, env, cfg.generation, cfg.run.eval_samples, episodes=episodes
                        )
                    )
                metrics.update(engine.step_metrics())  # which engines served, their speed, restarts
                metrics.update(faults.metrics())  # restarts and steps re-done, once there were any
                run_dir.log(step, metrics)
                faults.step_done(step)
                bar.update(step, metrics)
                # checkpoint_every=0: only the final checkpoint. Preempted (SIGTERM, SIGUSR1): this one, then stop.
                preempted = faults.preempted
                due = cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0
                if due or step == cfg.run.steps or preempted:
                    with faults.phase("checkpoint", step):
                        run_dir.save_checkpoint(step, policy.save, rollouts.state_dict())
                if preempted and step < cfg.run.steps:
                    return faults.requeue(step)
        if cfg.run.export_hf_at_end:
            from checkpoint_converters.hf_io import write_hf_checkpoint

            write_hf_checkpoint(policy.hf_weights(), model_dir, run_dir.path / "hf_export", overwrite=True)
        return 0

    with faults:
        status = faults.run(attempt)
    run_dir.close()
    return status


def _mismatch(seqs: list[dict[str, Any]]) -> float:
    import torch

    lp = torch.cat([s["old_lp"] for s in seqs])
    engine = torch.cat([s["engine_lp"] for s in seqs])
    mask = torch.cat([s["resp"] for s in seqs])
    return token_mult_prob_error(lp, engine, mask)
