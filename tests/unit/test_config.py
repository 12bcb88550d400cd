"""Hydra recipes and config groups on the typed schema, and the CLI's answers to bad input."""

from __future__ import annotations

import pytest
import yaml

from megatron_rl.config.compose import CONF_DIR, compose, groups, recipes, save_resolved
from megatron_rl.errors import UserError
from megatron_rl.launch.__main__ import ALGORITHMS, main, parse

PRIMARY = [
    "tiny",
    "smollm2_135m_math",
    "llama8b",
    "llama70b",
    "qwen3_30b_a3b",
    "qwen3_235b_a22b",
    "mixtral8x7b",
]


def test_every_recipe_composes_from_the_config_groups():
    assert set(PRIMARY) <= set(recipes())
    g = groups()
    for group in ("model", "algorithm", "policy/parallel", "generation", "cluster", "logger"):
        assert g.get(group), group
    for name in PRIMARY:
        cfg = compose(name)
        assert cfg.recipe == name and cfg.run.name == name and cfg.run.dir == f"runs/grpo/{name}"
        # Every primary recipe picks one option of every group, then sets its own values.
        defaults = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())["defaults"]
        chosen = {k for d in defaults if isinstance(d, dict) for k in d}
        assert chosen == {"model", "algorithm", "policy/parallel", "generation", "cluster", "logger"}, name


def test_groups_land_in_their_sections_and_can_be_switched():
    cfg = compose("llama70b")
    assert cfg.model.arch.num_hidden_layers == 80 and cfg.policy.parallel.tp == 8
    assert cfg.grpo.dynamic_sampling and cfg.grpo.overlong_filter  # algorithm: dapo
    cfg = compose("llama70b", ["model=llama3_8b", "algorithm=grpo_kl", "policy/parallel=tp2_sp"])
    assert cfg.model.arch.num_hidden_layers == 32 and cfg.policy.parallel.tp == 2
    assert cfg.grpo.kl_coef == 0.04 and not cfg.grpo.dynamic_sampling
    # The recipe file's own values beat its groups', the command line beats both.
    assert compose("tiny").generation.max_new_tokens == 8
    assert compose("tiny", ["generation.max_new_tokens=12"]).generation.max_new_tokens == 12


def test_profile_supplies_site_facts_and_the_command_line_wins():
    cfg = compose("llama8b")
    assert cfg.cluster.account == "my_account" and cfg.cluster.mounts == ["/lustre:/lustre"]
    assert cfg.cluster.env.NCCL_NVLS_ENABLE == "0"
    cfg = compose("llama8b", ["cluster.account=rl_team", "cluster.env.NCCL_NVLS_ENABLE=1", "cluster.env.X=y"])
    assert cfg.cluster.account == "rl_team"
    assert cfg.cluster.env.NCCL_NVLS_ENABLE == "1" and cfg.cluster.env.X == "y"
    assert cfg.cluster.partition == "batch"  # untouched profile values stay


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grpo", "conf=tiny", "policy.optim.llr=3"], "Did you mean 'policy.optim.lr'?"),
        (["grpo", "conf=tiny", "+grpo.kl_coeff=0.1"], "Unknown config key 'grpo.kl_coeff'"),
        (["grpo", "conf=tiny", "+grpo.kl_coeff=0.1"], "Did you mean 'grpo.kl_coef'?"),
        (["grpo", "conf=tiny", "+grpo.new_knob=1"], "Keys added with '+' must exist in the schema"),
        (["grpo", "conf=tiny", "run.steps=many"], "'run.steps' has the wrong type: Value 'many'"),
        (["grpo", "conf=tiny", "policy.parallel.tp=2.5"], "'policy.parallel.tp' has the wrong type"),
        (["grpo", "conf=llama7b"], "Unknown recipe 'llama7b'; available: "),
        (["grpo", "conf=llama7b"], "Did you mean 'llama70b'?"),
        (["grpo", "conf=tiny", "model=llama3_9b"], "Unknown option 'llama3_9b' for config group 'model'"),
        (["grpo", "conf=tiny", "policy.recompute=selctive"], "Did you mean 'selective'?"),
        (["grpo", "conf=tiny", "generation.top_p=1.5"], "generation.top_p=1.5 is out of range"),
        (["grpo", "conf=tiny", "cluster.profile=nowhere"], "Unknown cluster profile 'nowhere'"),
        (["grpo", "conf=tiny", "+policy.parallel.tp=4"], "drop the '+'"),
        (["grpo", "conf=tiny", "steps"], "is not of the form key=value"),
        (["ppo", "conf=tiny"], "Unknown algorithm 'ppo'"),
        (["grpo", "conf=tiny", "--dryrun"], "Unknown flag(s) --dryrun"),
    ],
)
def test_cli_errors_are_one_paragraph_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_recipe_lists_every_recipe(capsys):
    assert main(["grpo", "conf=nope"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in PRIMARY)


def test_keys_inside_recipe_files_are_checked_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(tmp_path))
    (tmp_path / "typo.yaml").write_text("defaults: [schema, _self_]\ngrpo: {clip_hihg: 0.3}\n")
    with pytest.raises(UserError, match="grpo.clip_hihg.*Did you mean 'grpo.clip_high'"):
        compose("typo")
    (tmp_path / "badtype.yaml").write_text("defaults: [schema, _self_]\nrun: {steps: lots}\n")
    with pytest.raises(UserError, match="run.steps"):
        compose("badtype")


def test_help_lists_algorithms_recipes_and_groups(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Algorithms: grpo, sft, dpo, plan" in out
    assert all(name in out for name in PRIMARY)
    assert "policy/parallel: " in out and "h100_example" in out


def test_cfg_prints_the_composed_config(capsys):
    assert main(["grpo", "conf=llama70b", "policy.parallel.pp=8", "launcher=local", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["policy"]["parallel"]["pp"] == 8 and cfg["cluster"]["launcher"] == "local"
    assert cfg["model"]["hf_path"] == "/lustre/models/Llama-3.1-70B-Instruct"
    assert cfg["cluster"]["account"] == "my_account"  # from the profile


def test_no_arguments_mean_grpo_on_tiny():
    assert parse([]) == ("grpo", "tiny", [], set(), "grpo")
    args = parse(["plan", "sft", "conf=llama8b", "launcher=slurm"])
    assert args == ("plan", "llama8b", ["cluster.launcher=slurm"], set(), "sft")


def test_run_directory_gets_the_resolved_config(tmp_path, monkeypatch):
    import sys
    import types

    seen = {}
    module = types.ModuleType("fake_algo")
    module.run = lambda cfg: seen.setdefault("cfg", cfg) and 0
    monkeypatch.setitem(sys.modules, "fake_algo", module)
    monkeypatch.setitem(ALGORITHMS, "grpo", "fake_algo:run")
    assert main(["grpo", "conf=tiny", f"run.dir={tmp_path}", "run.steps=7", "--in-process"]) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["run"]["steps"] == 7 and saved["recipe"] == "tiny" and seen["cfg"].run.steps == 7
    assert not list(tmp_path.glob(".config.yaml.*"))  # written through a temp file, then renamed
    save_resolved(seen["cfg"], tmp_path)  # idempotent


def test_cluster_profile_keys_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(tmp_path))
    tmp_path = tmp_path / "clusters"
    tmp_path.mkdir()
    (tmp_path / "site.yaml").write_text("acount: x\n")
    with pytest.raises(
        UserError, match=r"Unknown key 'acount' in cluster profile .*site.yaml. Did you mean 'account'"
    ):
        compose("llama8b", ["cluster.profile=site"])
    (tmp_path / "site.yaml").write_text("gpus_per_node: eight\n")
    with pytest.raises(UserError, match=r"cluster.gpus_per_node.*wrong type.*site.yaml"):
        compose("llama8b", ["cluster.profile=site"])
    (tmp_path / "site.yaml").write_text("account: a\ngpus_per_node: 4\ngpu_memory_gb: 141\n")
    cfg = compose("llama8b", ["cluster.profile=site", "cluster.gpus_per_node=8"])
    assert (cfg.cluster.account, cfg.cluster.gpus_per_node, cfg.cluster.gpu_memory_gb) == ("a", 8, 141)
