"""Test-only ComfyUI nodes for the end-to-end suite (never shipped): conditioning of a given shape without a text
encoder, and an output node that saves tensors (latent or conditioning) as safetensors for the test to compare."""

import os

import folder_paths
import torch
from safetensors.torch import save_file


class FP16LRTestConditioning:
    """Seeded random conditioning: [1, tokens, width] plus a pooled [1, pooled] vector (FLUX: 4096 and 768)."""

    CATEGORY = "testing/fp16lr"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                             "pooled": ("INT", {"default": 768, "min": 1, "max": 16384}),
                             "guidance": ("FLOAT", {"default": 3.5})}}

    def make(self, seed, tokens, width, pooled, guidance):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn((1, tokens, width), generator=g)
        pool = torch.randn((1, pooled), generator=g)
        return ([[cond, {"pooled_output": pool, "guidance": guidance}]],)


class FP16LRTestSaveTensors:
    """Save a LATENT's samples and/or a CONDITIONING's tensors to output/<filename>.safetensors."""

    CATEGORY = "testing/fp16lr"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "fp16lr_test"})},
                "optional": {"latent": ("LATENT",), "conditioning": ("CONDITIONING",)}}

    def save(self, filename, latent=None, conditioning=None):
        tensors = {}
        if latent is not None:
            tensors["latent"] = latent["samples"].float().contiguous()
        if conditioning is not None:
            tensors["cond"] = conditioning[0][0].float().contiguous()
            pooled = conditioning[0][1].get("pooled_output")
            if pooled is not None:
                tensors["pooled"] = pooled.float().contiguous()
        path = os.path.join(folder_paths.get_output_directory(), filename + ".safetensors")
        save_file(tensors, path)
        return {"ui": {"fp16lr_test": [{"filename": filename + ".safetensors"}]}}


NODE_CLASS_MAPPINGS = {"FP16LRTestConditioning": FP16LRTestConditioning,
                       "FP16LRTestSaveTensors": FP16LRTestSaveTensors}
