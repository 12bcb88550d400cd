"""MEGATRON_RL_CONF_DIR: a user directory of recipes, group options, cluster profiles and suites that overlays
the packaged ones (a user file wins over the packaged file of the same name)."""

from __future__ import annotations

import pytest
import yaml

from megatron_rl.config.compose import CONF_DIR, PROFILES_DIR, compose, groups, profiles, recipes
from megatron_rl.errors import UserError
from megatron_rl.launch.__main__ import main
from megatron_rl.nightly.suite import SUITES_DIR, available_suites, find_suite, load_suite


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(tmp_path))
    return tmp_path


def test_assets_ship_inside_the_package():
    assert (CONF_DIR / "tiny.yaml").is_file() and (CONF_DIR / "model" / "tiny_llama.yaml").is_file()
    assert (PROFILES_DIR / "h100_example.yaml").is_file() and (SUITES_DIR / "cpu_smoke.yaml").is_file()
    assert CONF_DIR.parent.name == "megatron_rl" and SUITES_DIR.parent.name == "nightly"


def test_user_recipe_composes_with_packaged_groups(user_dir):
    (user_dir / "mine.yaml").write_text(
        "defaults:\n  - schema\n  - model: tiny_llama\n  - algorithm: dapo\n  - policy/parallel: tp1\n"
        "  - _self_\nrun: {steps: 3}\n"
    )
    assert "mine" in recipes() and "tiny" in recipes()  # the user's next to the packaged ones
    cfg = compose("mine", ["run.seed=5"])
    assert cfg.recipe == "mine" and cfg.run.steps == 3 and cfg.run.seed == 5
    assert cfg.model.hf_path == "tiny:llama" and cfg.policy.parallel.tp == 1
    assert cfg.grpo.dynamic_sampling and cfg.grpo.overlong_filter  # the packaged algorithm/dapo.yaml
    # The packaged recipes still compose while a user directory is set.
    assert compose("llama70b").model.arch.num_hidden_layers == 80


def test_user_files_shadow_packaged_ones_of_the_same_name(user_dir):
    (user_dir / "model").mkdir()
    (user_dir / "model" / "llama3_8b.yaml").write_text(
        yaml.safe_dump({"hf_path": "/site/models/llama3_8b", "arch": {"num_hidden_layers": 4}})
    )
    (user_dir / "model" / "mymodel.yaml").write_text("hf_path: /site/models/mine\n")
    (user_dir / "tiny.yaml").write_text("defaults: [schema, {model: mymodel}, _self_]\nrun: {steps: 2}\n")
    # A packaged recipe picks up the user's group option of the same name...
    cfg = compose("llama8b")
    assert cfg.model.hf_path == "/site/models/llama3_8b" and cfg.model.arch.num_hidden_layers == 4
    # ...a user recipe replaces the packaged one of the same name, and new options join the group.
    cfg = compose("tiny")
    assert cfg.run.steps == 2 and cfg.model.hf_path == "/site/models/mine"
    assert "mymodel" in groups()["model"] and "llama3_70b" in groups()["model"]
    assert compose("tiny", ["model=llama3_8b"]).model.hf_path == "/site/models/llama3_8b"


def test_user_cluster_profiles_and_suites(user_dir):
    (user_dir / "clusters").mkdir()
    (user_dir / "clusters" / "mysite.yaml").write_text("account: team\ngpus_per_node: 4\n")
    (user_dir / "clusters" / "h100_example.yaml").write_text("account: shadowed\n")
    (user_dir / "suites").mkdir()
    (user_dir / "suites" / "mine.yaml").write_text(
        "launcher: local\nentries: [{name: e1, recipe: tiny, steps: 2}]\n"
    )
    # Neither folder is a config group, though it sits among the group folders.
    assert "clusters" not in groups() and "suites" not in groups() and "model" in groups()
    assert {"mysite", "h100_example"} <= set(profiles())
    cfg = compose("llama8b", ["cluster.profile=mysite"])
    assert (cfg.cluster.account, cfg.cluster.gpus_per_node) == ("team", 4)
    assert compose("llama8b").cluster.account == "shadowed"  # llama8b's default profile, the user's copy
    assert "mine" in available_suites() and "cpu_smoke" in available_suites()
    assert find_suite("mine") == user_dir / "suites" / "mine.yaml"
    assert [e.recipe for e in load_suite("mine").entries] == ["tiny"]
    assert find_suite("cpu_smoke") == SUITES_DIR / "cpu_smoke.yaml"


def test_missing_user_dir_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"MEGATRON_RL_CONF_DIR=.*nowhere does not exist"):
        recipes()
    nightly = ["nightly", "--suite", "cpu_smoke", "--dry-run"]
    for argv in (["grpo", "conf=tiny", "--cfg"], ["--help"], nightly):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: MEGATRON_RL_CONF_DIR=") and err.count("\n") == 1, argv
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(tmp_path / "file"))
    with pytest.raises(UserError, match="is not a directory"):
        compose("tiny")


def test_help_says_where_user_recipes_go(user_dir, capsys):
    (user_dir / "mine.yaml").write_text("defaults: [schema, _self_]\n")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "MEGATRON_RL_CONF_DIR=DIR" in out and f"{user_dir} then {CONF_DIR}" in out
    assert "mine" in out.split("Recipes: ")[1].splitlines()[0]


def test_malformed_yaml_is_one_line_naming_file_and_line(user_dir, capsys):
    (user_dir / "broken.yaml").write_text("defaults: [schema, _self_]\nrun: {steps: 3\n")
    (user_dir / "clusters").mkdir()
    (user_dir / "clusters" / "site.yaml").write_text("account: [x\n")
    (user_dir / "suites").mkdir()
    (user_dir / "suites" / "bad.yaml").write_text("entries:\n  - name: [e1\n")
    cases = [
        (["grpo", "conf=broken", "--cfg"], f"not valid YAML: {user_dir / 'broken.yaml'}, line 3, column 1: "),
        (
            ["grpo", "conf=llama8b", "cluster.profile=site", "--cfg"],
            "site.yaml is not valid YAML: line 2, column 1",
        ),
        (["nightly", "--suite", "bad", "--dry-run"], "bad.yaml is not valid YAML: line 3, column 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
