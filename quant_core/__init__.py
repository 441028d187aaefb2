"""quant_core: convert safetensors checkpoints to scaled FP16 with learned rounding on the fp16 grid.

A plain library (torch, safetensors, tqdm); it never imports ComfyUI. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

from .errors import Cancelled, ConversionError  # noqa: E402
from .options import ConvertOptions  # noqa: E402
from .convert import convert, convert_file  # noqa: E402
from .sources import StateDictSource  # noqa: E402
from .format import iter_dequantized, load_dequantized_state_dict  # noqa: E402

__all__ = ["__version__", "Cancelled", "ConversionError", "ConvertOptions", "StateDictSource", "convert", "convert_file",
           "iter_dequantized", "load_dequantized_state_dict"]
