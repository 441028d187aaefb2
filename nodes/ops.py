"""Run-time scaling for ComfyUI: Linear layers that keep the file's fp16 weight `q` and its `scale_weight`, and use
`q * scale_weight` when they run, handed to ComfyUI through `model_options["custom_operations"]`.

Why: where `q * scale_weight` does not fit fp16 exactly (a scale other than 1 on values outside fp16's normal range,
which is most weights of a `--scale pow2` file made from FP32 weights), dequantizing at load widens the weight to
fp32 and the model costs what an fp32 model costs. Kept scaled, it costs what an fp16 model of the same shape costs.

Everything else behaves as ComfyUI's own manual-cast operations (weights are cast to the input's dtype when a layer
runs). LoRAs and other weight patches see the real weight: ComfyUI's ModelPatcher calls `convert_weight` before
patching and `set_weight` to store the result, as it does for its own scaled layers.
"""

from __future__ import annotations

import comfy.float
import comfy.ops
import torch

SCALE = "scale_weight"
# stored beside a scaled weight by the converter; in T5XXL mode a copy of the scale (not used here)
DROPPED = ("scale_input",)


class ScaledFP16Ops(comfy.ops.manual_cast):
    """ComfyUI operations (comfy.ops.manual_cast) whose Linear applies a per-tensor `scale_weight` at run time."""

    class Linear(comfy.ops.manual_cast.Linear):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            scale = state_dict.pop(prefix + SCALE, None)
            for name in DROPPED:
                state_dict.pop(prefix + name, None)
            if scale is not None:
                # a copy: a tensor read from a memory-mapped file keeps the whole mapping (and its pages) alive
                scale = scale.detach().to(torch.float32).reshape(()).clone()
                weight = getattr(self, "weight", None)
                device = weight.device if isinstance(weight, torch.Tensor) else None
                if float(scale) == 1.0:
                    scale = None
                else:
                    # a buffer: it moves with the module between devices and is saved with its weight
                    self.register_buffer(SCALE, scale.to(device) if device is not None else scale)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

        def has_runtime_scale(self) -> bool:
            return isinstance(getattr(self, SCALE, None), torch.Tensor)

        def _scale_like(self, weight: torch.Tensor) -> torch.Tensor:
            return getattr(self, SCALE).to(device=weight.device, dtype=weight.dtype)

        # manual_cast layers always run through forward_comfy_cast_weights (also under ComfyUI's low-VRAM mode)
        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if not self.has_runtime_scale():
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            weight, bias = comfy.ops.cast_bias_weight(self, input)
            # the scale is a power of two: in the compute dtype the product is exact wherever it is in range, so
            # this is the weight a dequantize-at-load model would hold after ComfyUI's own cast
            return torch.nn.functional.linear(input, weight * self._scale_like(weight), bias)

        # ModelPatcher's hooks (get_key_weight): the real weight for patches and savers, and back to storage
        def convert_weight(self, weight, inplace=False, **kwargs):
            if not self.has_runtime_scale():
                return weight
            if inplace:
                weight *= self._scale_like(weight)
                return weight
            return weight * self._scale_like(weight)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if self.has_runtime_scale():
                weight = weight / self._scale_like(weight)  # exact: a power of two
            weight = comfy.float.stochastic_rounding(weight, self.weight.dtype, seed=seed or 0)
            if return_weight:
                return weight
            if inplace_update:
                self.weight.data.copy_(weight)
            else:
                self.weight = torch.nn.Parameter(weight, requires_grad=False)


def runtime_scaled_layers(model: torch.nn.Module) -> set[str]:
    """Names (module paths) of the layers of `model` that apply a scale at run time."""
    return {name for name, m in model.named_modules()
            if isinstance(m, ScaledFP16Ops.Linear) and m.has_runtime_scale()}
