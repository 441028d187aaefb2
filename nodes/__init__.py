"""ComfyUI glue of the scaled-FP16 pack. Importing this package needs ComfyUI's modules (folder_paths, comfy.*).

Node type names are a public contract: saved workflows store them. Never rename one.
"""

import logging
import sys

from . import paths
from .capture import ScaledFP16CapturePrompts, ScaledFP16CaptureSampling
from .convert import ScaledFP16Convert
from .loaders import (ScaledFP16CheckpointLoader, ScaledFP16CLIPLoader, ScaledFP16DualCLIPLoader,
                      ScaledFP16UNETLoader)
from .save import ScaledFP16SaveCLIP, ScaledFP16SaveModel

NODES = (ScaledFP16Convert, ScaledFP16SaveModel, ScaledFP16SaveCLIP, ScaledFP16UNETLoader, ScaledFP16CLIPLoader,
         ScaledFP16DualCLIPLoader, ScaledFP16CheckpointLoader, ScaledFP16CapturePrompts, ScaledFP16CaptureSampling)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.TITLE for cls in NODES}


def _is_user_error(error: BaseException | None) -> bool:
    """By name, not identity: a reloaded pack (or a second copy of it) has its own UserError class."""
    return error is not None and any(c.__name__ == paths.UserError.__name__ and c.__module__ == paths.USER_ERROR_MODULE
                                     for c in type(error).__mro__)


class _NoTracebackForUserErrors(logging.Filter):
    """ComfyUI logs every exception a node raises as a message line plus `traceback.format_exc()`. For our user
    errors (a bad name, an existing file, an unusable model: `paths.UserError`) the one-line message is the whole
    story: drop the traceback record, and only while such an error is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not _is_user_error(sys.exc_info()[1]):
            return True
        return not str(record.msg).startswith("Traceback (most recent call last)")


def _install_log_filter() -> None:
    root = logging.getLogger()
    if not any(type(f).__name__ == _NoTracebackForUserErrors.__name__ for f in root.filters):
        root.addFilter(_NoTracebackForUserErrors())


_install_log_filter()
