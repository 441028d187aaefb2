"""quant_core: convert safetensors checkpoints to scaled FP16 with learned rounding on the fp16 grid.

A plain library (torch, safetensors, tqdm); it never imports ComfyUI. See docs/ARCHITECTURE.md.
"""

from ._version import __version__
from .convert import convert, convert_file
from .errors import Cancelled, ConversionError
from .options import ConvertOptions
from .readback import iter_dequantized, load_dequantized_state_dict
from .sources import StateDictSource

__all__ = ["__version__", "Cancelled", "ConversionError", "ConvertOptions", "StateDictSource", "convert", "convert_file",
           "iter_dequantized", "load_dequantized_state_dict"]
