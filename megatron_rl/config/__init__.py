"""Typed config schema and Hydra composition of recipes (conf/)."""
