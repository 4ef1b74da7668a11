"""Weight import from the PyTorch originals: a safe .pth reader and the key/layout mapping to Flax."""

from lit_jax.convert.torch_reader import CheckpointFormatError, UnsafeCheckpointError, extract_state_dict, read_pth
from lit_jax.convert.mapping import ConversionError, ConversionReport
from lit_jax.convert.lit import convert_backbone, load_pth
from lit_jax.convert.store import load_variables, save_variables

__all__ = [
    "CheckpointFormatError", "ConversionError", "ConversionReport", "UnsafeCheckpointError",
    "convert_backbone", "extract_state_dict", "load_pth", "load_variables", "read_pth", "save_variables",
]
