"""GPU-only checks of the policy core (Transformer Engine specs, NCCL). Skipped where no GPU exists."""

from __future__ import annotations

import pytest
import torch

from megatron_rl import distributed
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional import parallel_scenarios as sc

needs_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (TP=2 vs TP=1)")


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@needs_gpu
@pytest.mark.gpu
@pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine")
def test_te_spec_trains_on_gpu(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    out = distributed.spawn(sc.dense_equivalence, 2, str(model), str(tmp_path / "ck"))[0]
    assert (out["tp1_logits"] - out["tp2_logits"]).abs().max().item() <= 1e-3
    assert out["pp2_losses"][-1] < out["pp2_step"]["loss"]
