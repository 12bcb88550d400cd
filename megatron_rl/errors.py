"""Errors a user can act on. The CLI prints their message as one paragraph and exits nonzero."""


class UserError(Exception):
    """Bad input from the user (config, layout, file, dataset line). The message names the thing to fix."""


class LayoutError(UserError):
    """A parallel layout that cannot work for this model or world size."""


class UnsupportedArchitectureError(UserError):
    """A Hugging Face `architectures` value with no Megatron mapping."""
