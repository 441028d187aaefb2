"""ComfyUI entry point of comfyui-scaled-fp16: nodes that convert to, save and load scaled FP16.

ComfyUI imports this file as a package. Outside ComfyUI (pytest collecting from the repository root, tools that
import the folder) ComfyUI's modules are missing; then the pack registers no nodes instead of failing. Inside
ComfyUI any import error of the pack itself is raised, so a broken install shows in the server log.
"""

WEB_DIRECTORY = "./web"


def _inside_comfyui() -> bool:
    try:
        import comfy  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    return True


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
