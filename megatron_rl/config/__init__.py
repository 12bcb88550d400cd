"""Typed config schema and Hydra composition of recipes (megatron_rl/conf/, or MEGATRON_RL_CONF_DIR)."""
