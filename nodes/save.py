"""Save nodes: convert a MODEL or CLIP from the graph (e.g. with a LoRA applied) to scaled-FP16 files."""

from __future__ import annotations

import os

from ..quant_core.errors import ConversionError
from . import paths
from .common import ConvertingNode, conversion_options, node_result, run_conversion
from .graph_weights import GraphTensor, graph_source, graph_tensors
from .progress import ConversionProgress

# ComfyUI's text-encoder attribute names inside a CLIP; T5XXL rules only make sense for T5 encoders
T5_ENCODERS = ("t5xxl", "t5base", "t5", "pile_t5xl", "mt5xl", "umt5xxl", "t5xl")


def save_graph_model(parts: list[tuple[str, list[GraphTensor]]], kind: str, output_name: str, widgets: dict,
                     unique_id: str | None) -> dict:
    """Convert each part's weights straight from the graph and save it; returns the node result.

    Each tensor is computed (patched) only when the converter asks for it, so neither a second copy of the model in
    memory nor a copy of its weights on disk ever exists. `parts` lists (name suffix, tensors); with more than one
    part each is saved as `<output_name>_<suffix>`, under one progress bar; t5xxl mode then applies to T5 parts only.
    """
    steps_total = sum(len(t) for _, t in parts)
    steps_done = 0
    saved, summaries = [], []
    for suffix, tensors in parts:
        progress = ConversionProgress(unique_id, steps_before=steps_done, steps_total=steps_total)
        try:
            name = output_name.strip() or "model"
            if len(parts) > 1:
                name = f"{name.removesuffix(paths.SAFETENSORS)}_{suffix}"
            dst, saved_name = paths.output_path(kind, name, widgets["overwrite"])
            options = conversion_options(widgets, part=suffix,
                                         t5xxl=widgets["t5xxl"] and (len(parts) == 1 or suffix in T5_ENCODERS))
            if not tensors:
                raise ConversionError(f"{saved_name}: the {suffix} part of the graph model has no weights")
            source = graph_source(tensors, f"ComfyUI graph ({suffix})")
        except BaseException as e:
            progress.failed(e)
            raise
        report = run_conversion(source, dst, options, progress)
        steps_done += len(tensors)
        saved.append(saved_name)
        # the size in is the weights as the graph holds them in memory (e.g. fp32 on a --cpu server), not a file
        in_memory = sorted({info.dtype for info in source.header.tensors.values() if info.is_float})
        summaries.append(progress.finished(report, saved_name, {"source_in_memory": in_memory}))
    paths.refresh_file_list(kind)
    return node_result(saved, summaries)


def saved_signature(kind: str, output_name: str) -> str:
    """The files a save node wrote under `output_name` (size, mtime): the graph input cannot be hashed, but a deleted
    or replaced output must make the node run again when the graph is queued unchanged."""
    try:
        stem = paths.checked_output_name(output_name).removesuffix(paths.SAFETENSORS)
    except paths.OutputNameError:
        return "invalid"  # the node itself reports why
    folder = os.path.dirname(os.path.join(paths.output_folder(kind), *stem.split("/")))
    base = os.path.basename(stem)
    names = sorted(f for f in os.listdir(folder) if f == base + paths.SAFETENSORS
                   or (f.startswith(base + "_") and f.endswith(paths.SAFETENSORS))) if os.path.isdir(folder) else []
    return paths.file_signature(*(os.path.join(folder, n) for n in names)) or "none"


class GraphSaveNode(ConvertingNode):
    """Base of the save nodes: the graph input GRAPH_INPUT = (name, ComfyUI type) is split into named parts of
    tensors (`parts`), each converted to a file in KIND under ComfyUI's output directory."""

    FUNCTION = "save"
    GRAPH_INPUT: tuple[str, str]
    KIND: str
    DEFAULT_NAME: str

    @classmethod
    def INPUT_TYPES(cls):
        name, comfy_type = cls.GRAPH_INPUT
        return cls.inputs({name: (comfy_type,)}, cls.DEFAULT_NAME)

    @classmethod
    def IS_CHANGED(cls, output_name="", **_):
        return saved_signature(cls.KIND, output_name or cls.DEFAULT_NAME)

    @staticmethod
    def parts(graph) -> list[tuple[str, list[GraphTensor]]]:
        raise NotImplementedError

    def save(self, output_name, unique_id=None, **inputs):
        parts = self.parts(inputs.pop(self.GRAPH_INPUT[0]))
        return save_graph_model(parts, self.KIND, output_name or self.DEFAULT_NAME, inputs, unique_id)


class ScaledFP16SaveModel(GraphSaveNode):
    """Convert the diffusion model in the graph (patches such as LoRAs applied) to a scaled-FP16 file."""

    TITLE = "Save Model as Scaled FP16"
    DESCRIPTION = ("Converts the MODEL as the graph has it (LoRAs and merges applied) to scaled FP16 and saves it to "
                   "diffusion_models under ComfyUI's output directory, one tensor at a time.")
    GRAPH_INPUT = ("model", "MODEL")
    KIND = "diffusion_models"
    DEFAULT_NAME = "model_float16_scaled_learned_svd"

    @staticmethod
    def parts(model):
        return [("model", graph_tensors(model, "diffusion_model."))]


class ScaledFP16SaveCLIP(GraphSaveNode):
    """Convert the text encoder(s) in the graph to scaled-FP16 files, one per encoder (like the stock CLIPSave)."""

    TITLE = "Save CLIP as Scaled FP16"
    DESCRIPTION = ("Converts each text encoder inside the CLIP (LoRAs applied) to scaled FP16 and saves it to "
                   "text_encoders under ComfyUI's output directory. A CLIP with several encoders (FLUX: clip_l + "
                   "t5xxl) gives one file per encoder, named <output_name>_<encoder>; t5xxl mode then applies to the "
                   "T5 encoders only.")
    GRAPH_INPUT = ("clip", "CLIP")
    KIND = "text_encoders"
    DEFAULT_NAME = "text_encoder_float16_scaled_learned_svd"

    @staticmethod
    def parts(clip):
        patcher = clip.patcher
        encoders = sorted({k.split(".", 1)[0] for k in patcher.model_state_dict() if "." in k})
        return [(enc, graph_tensors(patcher, enc + ".", strip=("transformer.",))) for enc in encoders]
