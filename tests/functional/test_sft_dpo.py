"""SFT and DPO end to end on a tiny Llama with 2 Megatron ranks on CPU.

One spawned 2-rank world runs every training scenario (the per-rank entry point the CLI uses, so imports
are paid once): SFT memorises 8 prompt->answer pairs (data parallel, dp=2), DPO learns a toy preference set
(pipeline parallel, pp=2), and each is run N steps straight and k steps + resume to N. One CLI run covers
`python -m megatron_rl.launch sft`, validation every K steps and the arithmetic data; bad data lines fail in
the CLI process before any rank starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl import distributed

# Memorisable: distinct prompts, answers of different lengths.
TOY_SFT = [
    ("Capital of France?", "Paris"),
    ("Capital of Japan?", "Tokyo"),
    ("What is 2+2?", "4"),
    ("Color of the sky?", "blue"),
    ("Opposite of hot?", "cold"),
    ("First letter?", "A"),
    ("Largest planet?", "Jupiter"),
    ("Author of Hamlet?", "Shakespeare"),
]
# Preferences with one consistent rule (greet, do not say goodbye). The rejected reply is the shorter one, so
# the random model (about ln 384 nats per token) prefers it: the policy's own ranking starts wrong.
TOY_DPO = [
    {"prompt": f"Say hello to {name}.", "chosen": f"Hello, {name}!", "rejected": f"Bye, {name}."}
    for name in ("Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal")
]
SFT_STEPS, SFT_SPLIT = 40, 20
DPO_STEPS, DPO_SPLIT = 16, 8
VOLATILE = ("time", "timing/", "throughput/", "memory/")


def _compose(recipe: str, *overrides: str):
    from megatron_rl.config.compose import compose

    return compose(recipe, ["logger.wandb=false", *overrides], command=recipe.split("_")[0])


def _train(rank: int, cfg: dict, model_dir: str, task_path: str):
    import importlib

    from megatron_rl.training.checkpoints import CheckpointManager
    from megatron_rl.training.loop import train_rank

    module, _, name = task_path.partition(":")
    resume = CheckpointManager(Path(cfg["run"]["dir"]) / "checkpoints").resume_from(None)
    return train_rank(
        rank, cfg, model_dir, str(resume) if resume else None, getattr(importlib.import_module(module), name)
    )


def scenarios(rank: int, runs: list[tuple[str, dict, str, str]]) -> dict[str, list[dict] | None]:
    """Runs each (label, config, model_dir, task) in this one world, in order."""
    return {label: _train(rank, cfg, model_dir, task) for label, cfg, model_dir, task in runs}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from omegaconf import OmegaConf

    from megatron_rl.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("sft_dpo")
    model_dir = str(save_tiny_checkpoint(root / "tiny", "llama", seed=0))
    sft_file, dpo_file = root / "toy_sft.jsonl", root / "toy_dpo.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TOY_SFT))
    dpo_file.write_text("".join(json.dumps(row) + "\n" for row in TOY_DPO))

    def sft(run_dir: Path, steps: int, export: bool = False, *extra: str) -> dict:
        cfg = _compose(
            "sft_tiny",
            f"run.dir={run_dir}",
            f"run.steps={steps}",
            f"run.checkpoint_every={SFT_SPLIT}",
            "run.keep_last=1",
            f"run.export_hf_at_end={export}",
            "data.kind=jsonl",
            f"data.path={sft_file}",
            "sft.batch_size=8",
            "sft.val_every=0",
            "policy.optim.lr=2e-3",
            "policy.micro_batch_tokens=96",  # several packed micro-batches per rank
            *extra,
        )
        return OmegaConf.to_container(cfg, resolve=True)

    def dpo(run_dir: Path, steps: int) -> dict:
        cfg = _compose(
            "dpo_tiny",
            f"run.dir={run_dir}",
            f"run.steps={steps}",
            f"run.checkpoint_every={DPO_SPLIT}",
            "run.keep_last=1",
            "run.export_hf_at_end=false",
            "run.eval_every=0",
            "data.kind=jsonl",
            f"data.path={dpo_file}",
            "dpo.batch_size=8",
            "dpo.beta=0.1",
            "dpo.sft_weight=0.1",
            "policy.optim.lr=2e-4",
            "policy.parallel.tp=1",
            "policy.parallel.pp=2",
            "policy.parallel.sequence_parallel=false",
        )
        return OmegaConf.to_container(cfg, resolve=True)

    SFT, DPO = "megatron_rl.sft.driver:SFTTask", "megatron_rl.dpo.driver:DPOTask"
    runs = [
        ("sft_straight", sft(root / "sft_a", SFT_STEPS, export=True), model_dir, SFT),
        ("sft_first", sft(root / "sft_b", SFT_SPLIT), model_dir, SFT),
        ("sft_resumed", sft(root / "sft_b", SFT_STEPS), model_dir, SFT),
        ("sft_unpacked", sft(root / "sft_c", 2, False, "sft.packing=false"), model_dir, SFT),
        ("dpo_straight", dpo(root / "dpo_a", DPO_STEPS), model_dir, DPO),
        ("dpo_first", dpo(root / "dpo_b", DPO_SPLIT), model_dir, DPO),
        ("dpo_resumed", dpo(root / "dpo_b", DPO_STEPS), model_dir, DPO),
    ]
    out = distributed.spawn(scenarios, 2, runs, timeout_s=600)[0]
    return {"root": root, "model_dir": model_dir, **out}


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_sft_loss_falls_and_the_model_reproduces_the_answers(results):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses = [r["train/loss"] for r in results["sft_straight"]]
    assert len(losses) == SFT_STEPS
    assert losses[0] > 5.0 and losses[-1] < 0.1, losses  # ln(384) = 5.95 at random init
    # Every step trains on exactly the 8 examples' response tokens (answer + end of turn).
    assert all(r["train/examples"] == 8 for r in results["sft_straight"])
    export = results["root"] / "sft_a" / "hf_export"
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    for prompt, answer in TOY_SFT:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == answer, prompt


def test_sft_loss_does_not_depend_on_packing(results):
    # One example per micro-batch instead of packed rows: the same global token mean, the same update.
    packed, unpacked = results["sft_straight"][:2], results["sft_unpacked"]
    assert unpacked[0]["train/micro_batches"] == 4 and packed[0]["train/micro_batches"] < 4  # per rank
    for a, b in zip(packed, unpacked):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


def test_sft_resume_is_exact(results):
    straight, resumed = results["sft_straight"], results["sft_first"] + results["sft_resumed"]
    assert [r["step"] for r in resumed] == list(range(1, SFT_STEPS + 1))
    assert _stable(resumed) == _stable(straight)
    rows = [json.loads(x) for x in (results["root"] / "sft_b" / "metrics.jsonl").read_text().splitlines()]
    assert _stable(rows) == _stable(straight)  # the metrics file reads as one uninterrupted run
    kept = sorted(p.name for p in (results["root"] / "sft_b" / "checkpoints").iterdir())
    assert kept == ["step_000040"]  # keep_last=1: step 20 was pruned
    state = json.loads(
        (results["root"] / "sft_b" / "checkpoints" / "step_000040" / "trainer_state.json").read_text()
    )
    assert state["data"]["position"] == SFT_STEPS * 8 and state["world"] == 2


def test_dpo_preference_accuracy_rises(results):
    rows = results["dpo_straight"]
    acc = [r["train/accuracy"] for r in rows]
    margin = [r["train/rewards/margin"] for r in rows]
    # Policy = reference at step 1: every margin is exactly 0, the loss exactly ln 2 (+ the SFT term).
    assert acc[0] == 0.0 and margin[0] == 0.0
    assert rows[0]["train/dpo_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[0]["train/loss"] == pytest.approx(0.693147 + 0.1 * rows[0]["train/sft_nll"], abs=1e-4)
    # The policy's own ranking starts wrong on every pair (it prefers the shorter reply) and ends right.
    assert rows[0]["train/policy_accuracy"] == 0.0 and rows[-1]["train/policy_accuracy"] == 1.0
    assert min(acc[-4:]) == 1.0, acc
    assert all(b > a for a, b in zip(margin, margin[1:])), margin
    assert margin[-1] > 1.5 and rows[-1]["train/dpo_loss"] < 0.15, (margin, rows[-1])
    assert rows[-1]["train/rewards/chosen"] > 0 > rows[-1]["train/rewards/rejected"]
    assert rows[-1]["train/pairs"] == 8


def test_dpo_resume_is_exact(results):
    resumed = results["dpo_first"] + results["dpo_resumed"]
    assert [r["step"] for r in resumed] == list(range(1, DPO_STEPS + 1))
    assert _stable(resumed) == _stable(results["dpo_straight"])


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(
    algo: str, *args: str, ray_address: str | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    cmd = [sys.executable, "-m", "megatron_rl.launch", algo, *args, "--in-process"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_on_a_ray_cluster_validates_every_k_steps(ray_cluster, tmp_path):
    """With RAY_ADDRESS set (how the Slurm launcher runs the CLI on the head node) the ranks are Ray actors
    of that cluster. Covers the command itself, validation every K steps, wandb files and the HF export."""
    address = ray_cluster.get_runtime_context().gcs_address
    proc = _cli(
        "sft", "conf=sft_tiny", f"run.dir={tmp_path}", "run.steps=20", "sft.val_every=10", ray_address=address
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(val) == [0, 10, 20]
    assert val[20] < val[10] < val[0], val
    assert (tmp_path / "hf_export" / "model.safetensors").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_bad_dataset_line_names_file_and_line(tmp_path):
    """The CLI checks the whole file before starting any rank (more kinds of bad line: tests/unit)."""
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    path = tmp_path / "prefs.jsonl"
    path.write_text(f'{good}\n\n{good}\n{{"prompt": "hi", "chosen": "a"}}\n{good}\n')
    run = tmp_path / "run"
    proc = _cli(
        "dpo",
        "conf=dpo_tiny",
        f"run.dir={run}",
        "model.warmup_sft_steps=0",
        "data.kind=jsonl",
        f"data.path={path}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path}:4: missing field(s) ['rejected']" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists()  # no rank started
