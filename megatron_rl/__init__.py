"""megatron-rl: Megatron-first RL post-training (GRPO, SFT, DPO)."""

__version__ = "0.1.0"
