"""Hydra recipes, CLI errors, and the Slurm (Ray on Slurm via NeMo-Run) script of the big recipes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_rl.config.compose import compose, recipes
from megatron_rl.errors import LayoutError, UserError
from megatron_rl.launch.__main__ import main
from megatron_rl.launch.slurm import check_layout, render

GPU_RECIPES = ["llama8b", "llama70b", "qwen3_30b_a3b", "qwen3_235b_a22b", "mixtral8x7b"]


def test_every_recipe_composes_and_its_layout_fits_its_cluster():
    assert set(GPU_RECIPES + ["tiny", "smollm2_135m_math"]) <= set(recipes())
    for name in GPU_RECIPES:
        cfg = compose(name)
        assert cfg.cluster.nodes * cfg.cluster.gpus_per_node >= 8
        assert check_layout(cfg) >= 1, name


def test_oversized_layout_fails_with_a_reason():
    with pytest.raises(LayoutError, match="World size 8 is not divisible by tp\\*pp\\*cp = 8\\*4\\*1 = 32"):
        check_layout(compose("llama70b", ["cluster.nodes=1"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grpo", "conf=tiny", "policy.optim.llr=3"], "Did you mean 'policy.optim.lr'?"),
        (["grpo", "conf=tiny", "+grpo.new_knob=1"], "Unknown config key 'grpo.new_knob'"),
        (["grpo", "conf=tiny", "run.steps=many"], "'run.steps' has the wrong type"),
        (["grpo", "conf=llama7b"], "Unknown recipe 'llama7b'; available: llama70b, llama8b"),
        (["ppo", "conf=tiny"], "Unknown algorithm 'ppo'"),
    ],
)
def test_cli_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_algorithms_and_recipes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "grpo, sft, dpo, plan" in out and "qwen3_235b_a22b" in out


def test_cfg_prints_the_composed_config(capsys):
    assert main(["grpo", "conf=llama70b", "policy.parallel.pp=8", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "pp: 8" in out and "hf_path: /lustre/models/Llama-3.1-70B-Instruct" in out


@pytest.mark.parametrize("recipe, nodes", [("llama70b", 16), ("qwen3_235b_a22b", 32)])
def test_slurm_script(recipe, nodes, tmp_path):
    overrides = [f"run.dir={tmp_path}", "grpo.kl_coef=0.01", "cluster.account=rl_team"]
    script = render(compose(recipe, overrides), "grpo", recipe, overrides)
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --account=rl_team" in script and "--account=rl_team" in script and "-A=" not in script
    assert script.count("ray start --head") == 1 and "ray start --address" in script
    assert "--container-image=nvcr.io/nvidia/nemo-rl:latest" in script
    assert "--container-mounts /lustre:/lustre" in script
    assert (
        f"RAY_ADDRESS=auto python -m megatron_rl.launch grpo conf={recipe} run.dir={tmp_path} "
        f"grpo.kl_coef=0.01 cluster.account=rl_team cluster.launcher=local"
    ) in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_dry_run_prints_only_the_script_on_stdout(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_rl.launch",
            "grpo",
            "conf=llama8b",
            "--dry-run",
            f"run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("#!/bin/bash") and "nothing submitted" in proc.stderr
    assert not (tmp_path / "slurm").exists() or not any((tmp_path / "slurm").rglob("*.sbatch"))


def test_missing_slurm_settings_are_named():
    with pytest.raises(UserError, match="cluster.account"):
        render(compose("llama8b", ["cluster.profile=null"]), "grpo", "llama8b", [])


@pytest.mark.parametrize(
    "recipe, published_b",
    [
        ("llama8b", 8.03),
        ("llama70b", 70.6),
        ("qwen3_30b_a3b", 30.5),
        ("qwen3_235b_a22b", 235.1),
        ("mixtral8x7b", 46.7),
    ],
)
def test_planner_fits_every_recipe_and_counts_parameters_like_the_model_cards(recipe, published_b, capsys):
    from megatron_rl.launch.plan import plan

    p = plan(compose(recipe))
    assert p["params_total_b"] == pytest.approx(published_b, rel=0.03)  # ignores biases/norm rounding
    assert p["total_gb"] <= p["budget_gb"]
    assert main(["plan", f"conf={recipe}"]) == 0
    assert "fits" in capsys.readouterr().err


def test_planner_rejects_an_oversized_layout(capsys):
    # 70B with tp=1, pp=1 on one node: each GPU would hold all 70B parameters.
    assert (
        main(
            [
                "plan",
                "conf=llama70b",
                "cluster.nodes=1",
                "policy.parallel.tp=1",
                "policy.parallel.pp=1",
                "policy.parallel.sequence_parallel=false",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "does not fit" in err and "largest part is grads" in err
