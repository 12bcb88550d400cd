"""Suite files: the shipped suites load, and every kind of bad suite file fails naming file, entry and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_rl.config.compose import recipes as known_recipes
from megatron_rl.errors import UserError
from megatron_rl.nightly.suite import SUITES_DIR, available_suites, find_suite, load_suite, select


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def minimal(**entry) -> dict:
    return {"entries": [{"name": "e1", "recipe": "tiny", "steps": 3, **entry}]}


def test_shipped_suites_load_with_known_recipes():
    assert {"cpu_smoke", "nightly", "release", "perf"} <= set(available_suites())
    recipes = set(known_recipes())
    for name in available_suites():
        suite = load_suite(name)
        assert suite.path == SUITES_DIR / f"{name}.yaml"
        assert suite.entries, name
        for e in suite.entries:
            assert e.recipe in recipes, (name, e.name, e.recipe)
            # the implicit "ran to the end" check comes first
            assert e.assertions[0].text == f"last(step) >= {e.steps}"
            assert len(e.assertions) > 1
    smoke = load_suite("cpu_smoke")
    assert smoke.launcher == "local" and [e.recipe for e in smoke.entries] == ["tiny"]
    for gpu in ("nightly", "release", "perf"):
        s = load_suite(gpu)
        assert s.launcher == "slurm" and all(e.nodes for e in s.entries)


def test_defaults_merge_and_entry_wins(tmp_path):
    path = write(
        tmp_path,
        {
            "defaults": {
                "steps": 5,
                "timeout_s": 100,
                "overrides": ["logger.wandb=false", "grpo.kl_coef=0.0"],
                "assertions": ["max(memory/peak_gb) < 75"],
            },
            "baseline": {"tolerance": 0.2, "tolerances": {"timing/step_s": {"rel": 0.3, "abs": 1}}},
            "entries": [
                {"name": "a", "recipe": "tiny", "overrides": {"grpo.kl_coef": 0.01, "run.resume": False}},
                {
                    "name": "b",
                    "recipe": "tiny",
                    "steps": 7,
                    "nodes": 2,
                    "timeout_s": 5,
                    "assertions": ["last(x) > 0"],
                },
            ],
        },
    )
    s = load_suite(str(path))
    a, b = s.entries
    assert a.overrides == ["logger.wandb=false", "grpo.kl_coef=0.01", "run.resume=false"]
    assert (a.steps, a.nodes, a.timeout_s) == (5, None, 100.0)
    assert [x.text for x in a.assertions] == ["last(step) >= 5", "max(memory/peak_gb) < 75"]
    assert (b.steps, b.nodes, b.timeout_s) == (7, 2, 5.0)
    assert [x.text for x in b.assertions] == ["last(step) >= 7", "max(memory/peak_gb) < 75", "last(x) > 0"]
    run_dir = tmp_path / "runs" / "b"
    assert b.launcher_overrides(run_dir)[-4:] == [
        f"run.dir={run_dir}",
        "run.name=b",
        "run.steps=7",
        "cluster.nodes=2",
    ]
    assert s.tolerance_for("median(timing/step_s)", "timing/step_s").allowed(10.0) == pytest.approx(3.0)
    assert s.tolerance_for("median(timing/step_s)", "timing/step_s").allowed(1.0) == pytest.approx(1.0)
    assert s.tolerance_for("max(memory/peak_gb)", "memory/peak_gb").allowed(10.0) == pytest.approx(2.0)


def test_malformed_assertion_in_suite_file(tmp_path):
    path = write(tmp_path, minimal(assertions=["median(train/loss) < 1.0", "mean(reward/mean[-10:] > 0.6"]))
    with pytest.raises(UserError) as info:
        load_suite(str(path))
    msg = str(info.value)
    assert str(path) in msg and "entry 'e1'" in msg and "'mean(reward/mean[-10:] > 0.6'" in msg
    assert "expected ')'" in msg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"entries": []}, "`entries` must be a non-empty list"),
        ({"entries": [{"recipe": "tiny"}]}, "entry #1 needs a `name`"),
        ({"entries": [{"name": "bad name", "recipe": "tiny"}]}, "entry #1 needs a `name`"),
        ({"entires": []}, "unknown key 'entires'"),
        (minimal(asserts=["x"]), "Did you mean 'assertions'?"),
        (minimal(command="echo hi"), "exactly one of `recipe`"),
        ({"entries": [{"name": "e1"}]}, "exactly one of `recipe`"),
        (minimal(steps="ten"), "steps must be an integer >= 1"),
        (minimal(steps=0), "steps must be an integer >= 1"),
        (minimal(timeout_s=-1), "timeout_s must be a number >= 1"),
        (minimal(overrides=["run.steps=10"]), "use the entry's `steps:` field"),
        (minimal(overrides=["run.dir=/x"]), "own run directory"),
        (minimal(overrides=["novalue"]), "not of the form key=value"),
        (minimal(overrides={"policy": {"tp": 2}}), "spell out its leaf keys"),
        (minimal(assertions="max(x) < 1"), "assertions must be a list"),
        ({"launcher": "k8s", **minimal()}, "launcher must be 'local' or 'slurm'"),
        ({"baseline": {"tolerance": "big"}, **minimal()}, "tolerance must be a number"),
        ({"baseline": {"tolerances": {"x": {"pct": 1}}}, **minimal()}, "unknown key 'pct'"),
        (
            {"entries": [{"name": "a", "recipe": "tiny"}, {"name": "a", "recipe": "tiny"}]},
            "two entries are named 'a'",
        ),
    ],
)
def test_bad_suite_files(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_suite(str(path))
    assert needle in str(info.value) and str(path) in str(info.value), str(info.value)


def test_invalid_yaml_and_unknown_suite(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [mean(reward/mean[-10:]) > 0.6]\n")  # flow list: '[' inside needs quotes
    with pytest.raises(UserError, match="is not valid YAML"):
        load_suite(str(bad))
    with pytest.raises(UserError, match=r"Unknown suite 'nope'.*available suites: .*cpu_smoke"):
        find_suite("nope")


def test_select_by_glob(tmp_path):
    path = write(
        tmp_path,
        {"entries": [{"name": n, "recipe": "tiny"} for n in ("llama8b", "llama70b", "mixtral")]},
    )
    s = load_suite(str(path))
    assert [e.name for e in select(s, None)] == ["llama8b", "llama70b", "mixtral"]
    assert [e.name for e in select(s, "llama*")] == ["llama8b", "llama70b"]
    assert [e.name for e in select(s, "mixtral, llama70b")] == ["llama70b", "mixtral"]
    with pytest.raises(UserError, match="matches no entry.*llama8b, llama70b, mixtral"):
        select(s, "qwen*")
