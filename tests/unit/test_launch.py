"""The Ray-on-Slurm sbatch script (NeMo-Run SlurmExecutor) of the big recipes, and the dry run's contract."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.errors import LayoutError, UserError
from megatron_rl.launch.__main__ import main
from megatron_rl.launch.slurm import NODE_SCRIPT, render


def node_program(script: str) -> str:
    """The per-node program the batch script writes with a quoted heredoc."""
    m = re.search(r"<<'MEGATRON_RL_RAY_NODE'\n(.*?)\nMEGATRON_RL_RAY_NODE\n", script, re.S)
    assert m, "the batch script must carry the node program"
    return m.group(1)


def bash_syntax_ok(text: str, tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("recipe, nodes", [("llama70b", 16), ("qwen3_235b_a22b", 32)])
def test_slurm_script_of_a_big_recipe(recipe, nodes, tmp_path):
    overrides = [
        f"run.dir={tmp_path}/run",
        "grpo.kl_coef=0.01",
        "cluster.account=rl_team",
        "data.system_prompt='Think, then answer: 1, 2.'",
        "+cluster.env.WANDB_PROJECT=my proj",
    ]
    cfg = compose(recipe, overrides)
    script = render(cfg, "grpo", recipe, overrides)
    run = f"{tmp_path}/run"
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))
    assert sbatch["nodes"] == str(nodes) and sbatch["gpus-per-node"] == "8"
    assert sbatch["ntasks-per-node"] == "1"  # one task per node: the Ray head or a Ray worker
    assert sbatch["account"] == "rl_team" and sbatch["partition"] == "batch" and sbatch["time"] == "04:00:00"
    assert sbatch["output"].startswith(f"{run}/slurm/")  # logs in the run directory
    # One srun step, in the container, with the profile's mounts plus the run directory.
    sruns = [ln for ln in script.splitlines() if ln.startswith("srun --output")]
    assert len(sruns) == 1
    srun = shlex.split(sruns[0])
    assert srun[srun.index("--container-image") + 1] == "nvcr.io/nvidia/nemo:25.07"
    mounts = srun[srun.index("--container-mounts") + 1].split(",")
    assert "/lustre:/lustre" in mounts and f"{run}:{run}" in mounts and f"{run}/slurm:/nemo_run" in mounts
    assert srun[-2:] == ["bash", f"/nemo_run/{NODE_SCRIPT}"] and "--kill-on-bad-exit=1" in srun
    assert "export WANDB_PROJECT='my proj'" in script and "export NCCL_NVLS_ENABLE=0" in script
    # The node program: exactly one Ray head (node 0), workers everywhere else, then the training command.
    node = node_program(script)
    assert node.count("ray start --head") == 1 and node.count('ray start --address="$head_ip:$port"') == 1
    assert 'if [ "$node" = 0 ]; then' in node and "gpus=8" in node
    command = next(ln for ln in node.splitlines() if "megatron_rl.launch" in ln)
    words = shlex.split(command)
    assert words[0] == "RAY_ADDRESS=$head_ip:$port"
    assert words[1:] == [
        "python",
        "-m",
        "megatron_rl.launch",
        "grpo",
        f"conf={recipe}",
        "grpo.kl_coef=0.01",
        "cluster.account=rl_team",
        "data.system_prompt='Think, then answer: 1, 2.'",
        "+cluster.env.WANDB_PROJECT=my proj",
        f"run.dir={run}",
        "cluster.launcher=local",
        "--in-process",
    ]
    # The command replays to the same config, run in-process on the head.
    again = compose(recipe, words[6:-1])
    assert again.grpo.kl_coef == 0.01 and again.data.system_prompt == "Think, then answer: 1, 2."
    assert again.cluster.launcher == "local" and again.cluster.nodes == nodes
    bash_syntax_ok(script, tmp_path, "job.sbatch")
    bash_syntax_ok(node, tmp_path, "node.sh")


def test_dry_run_prints_only_the_script_and_writes_nothing(capfd, tmp_path):
    # capfd: file-descriptor level, so stray prints from imports or libraries would show up too.
    argv = ["grpo", "conf=llama70b", f"run.dir={tmp_path}/run", "cluster.nodes=8", "policy.parallel.pp=2"]
    assert main([*argv, "--dry-run"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("#!/bin/bash\n") and out.endswith("fi\n")
    assert "#SBATCH --nodes=8" in out and "policy.parallel.pp=2" in out
    assert "nothing written, nothing submitted" in err
    assert not (tmp_path / "run").exists()
    # What the dry run prints is what would be submitted.
    assert out == render(compose("llama70b", argv[2:]), "grpo", "llama70b", argv[2:])


def test_local_dry_run_shows_the_experiment_task(capsys, tmp_path):
    assert main(["grpo", "conf=tiny", "run.steps=3", f"run.dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "NeMo-Run experiment 'grpo-tiny' on its LocalExecutor" in out
    task = shlex.split(out.splitlines()[-1])
    assert task == [
        sys.executable,
        "-m",
        "megatron_rl.launch",
        "grpo",
        "conf=tiny",
        "run.steps=3",
        f"run.dir={tmp_path}",
        "cluster.launcher=local",
        "--in-process",
    ]
    assert not any(tmp_path.iterdir())


def test_missing_slurm_settings_are_named():
    with pytest.raises(UserError, match="cluster.account, cluster.container_image"):
        render(compose("llama8b", ["cluster.profile=null"]), "grpo")
    with pytest.raises(UserError, match="gpus_per_node > 0"):
        render(
            compose("tiny", ["cluster.launcher=slurm", "cluster.account=a", "cluster.container_image=i"]),
            "grpo",
        )


def test_submission_checks_the_layout_first(capsys):
    # 16 nodes x 8 GPUs = 128 ranks cannot hold tp=8 x pp=3 (and 80 layers do not split in 3).
    assert main(["grpo", "conf=llama70b", "policy.parallel.pp=3", "--dry-run"]) == 2
    assert "not divisible by pp*vpp=3" in capsys.readouterr().err
    with pytest.raises(LayoutError):
        from megatron_rl.launch.slurm import submit

        submit(compose("llama70b", ["cluster.nodes=3"]), "grpo", [], dry_run=True)


def test_submit_without_sbatch_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["grpo", "conf=llama8b", f"run.dir={tmp_path}/run"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
