"""Shared, expensive fixtures: one local Ray cluster for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from megatron_rl.grpo.ray_utils import init_ray

    init_ray(num_cpus=4, log_to_driver=False)  # keep actor logs out of the test report
    yield ray
    ray.shutdown()
