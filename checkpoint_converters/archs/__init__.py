"""One module per architecture family; importing this package registers every mapping table."""

from checkpoint_converters.archs import llama, mixtral, qwen  # noqa: F401
