"""HF <-> Megatron checkpoint conversion; the same mapping tables drive per-step refit."""

from checkpoint_converters.live import export_hf_weights, load_hf_weights

__all__ = ["export_hf_weights", "load_hf_weights"]
