"""ComfyUI glue of the scaled-FP16 pack. Importing this package needs ComfyUI's modules (folder_paths, comfy.*).

Node type names are a public contract: saved workflows store them. Never rename one.
"""

from .convert import ScaledFP16Convert
from .loaders import (ScaledFP16CheckpointLoader, ScaledFP16CLIPLoader, ScaledFP16DualCLIPLoader,
                      ScaledFP16UNETLoader)
from .save import ScaledFP16SaveCLIP, ScaledFP16SaveModel

NODES = (ScaledFP16Convert, ScaledFP16SaveModel, ScaledFP16SaveCLIP, ScaledFP16UNETLoader, ScaledFP16CLIPLoader,
         ScaledFP16DualCLIPLoader, ScaledFP16CheckpointLoader)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.TITLE for cls in NODES}
