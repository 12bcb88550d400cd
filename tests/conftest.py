"""Shared, expensive fixtures: one local Ray cluster for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Without this Ray writes an auth token under $HOME; the test cluster is loopback-only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NeMo-Run keeps its experiments under NEMORUN_HOME (read once, at import): the tests' go to a folder of their
# own, never the user's ~/.nemo_run. Subprocesses inherit it.
os.environ["NEMORUN_HOME"] = tempfile.mkdtemp(prefix="nemorun-tests-")
atexit.register(shutil.rmtree, os.environ["NEMORUN_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 logical CPUs, no dashboard) shared by every test that needs actors. Actors
    ask for fractional CPUs, so an engine and a TP=2 policy fit side by side."""
    import ray

    from megatron_rl.ray_utils import init_ray

    init_ray(num_cpus=2, log_to_driver=False)  # keep actor logs out of the test report
    yield ray
    ray.shutdown()
