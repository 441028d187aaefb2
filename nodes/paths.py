"""Model folders: the combo lists the nodes show, resolving a selection, and where a converted file is saved.

ComfyUI knows each kind of model ("diffusion_models", "text_encoders", "checkpoints") as a list of folders; a file is
named by its path relative to one of them. The converter's combo mixes three kinds, so its entries carry the kind
in front (`diffusion_models/flux1-dev.safetensors`). Converted files go to the kind's folder under ComfyUI's output
directory, which ComfyUI registers as a model folder, so they appear in loader dropdowns without a restart.
"""

from __future__ import annotations

import os

import folder_paths

CONVERTIBLE_KINDS = ("diffusion_models", "checkpoints", "text_encoders")
SAFETENSORS = ".safetensors"
# calibration statistics written by `python -m quant_core capture`; a folder of our own under models/
CALIBRATION_KIND = "scaled_fp16_calibration"
NO_CALIBRATION = "none"


# ComfyUI shows an exception's class as `<module>.<name>`; a pack's module is its folder path, so user errors get a
# short module of their own (the UI then reads `scaled_fp16.OutputNameError`)
USER_ERROR_MODULE = "scaled_fp16"


class UserError(Exception):
    """Something the user can fix (a name, a file, a setting); one line that says what and how. The server log gets
    that line, not a traceback (see nodes/__init__.py)."""


class OutputNameError(UserError, ValueError):
    """An output name the user typed cannot be used; the message says why and what to do."""


class SourceError(UserError):
    """The chosen model file cannot be used (missing, not safetensors, damaged)."""


class ConversionFailed(UserError):
    """The converter refused the input (e.g. a NaN in a weight); the message names the file and the tensor."""


class SettingError(UserError):
    """A setting cannot be used as given (e.g. a memory budget too small for the statistics); the message says
    what would be needed."""


for _cls in (UserError, OutputNameError, SourceError, ConversionFailed, SettingError):
    _cls.__module__ = USER_ERROR_MODULE


def register_calibration_folder() -> None:
    if CALIBRATION_KIND not in folder_paths.folder_names_and_paths:
        folder = os.path.join(folder_paths.models_dir, CALIBRATION_KIND)
        folder_paths.folder_names_and_paths[CALIBRATION_KIND] = ([folder], {SAFETENSORS, ".json"})


def convertible_models() -> list[str]:
    """Every safetensors file of the convertible kinds, as `<kind>/<relative name>` (pickle files are not offered)."""
    return [f"{kind}/{name}" for kind in CONVERTIBLE_KINDS for name in folder_paths.get_filename_list(kind)
            if name.lower().endswith(SAFETENSORS)]


def split_model_choice(choice: str) -> tuple[str, str]:
    """`diffusion_models/sub/x.safetensors` -> ("diffusion_models", "sub/x.safetensors")."""
    kind, _, name = choice.replace("\\", "/").partition("/")
    if kind not in CONVERTIBLE_KINDS or not name:
        raise OutputNameError(f"'{choice}' is not a model choice; expected one of the folders "
                              f"{', '.join(CONVERTIBLE_KINDS)} followed by a file name")
    return kind, name


def calibration_files() -> list[str]:
    register_calibration_folder()
    return [NO_CALIBRATION] + folder_paths.get_filename_list(CALIBRATION_KIND)


def calibration_path(choice: str | None) -> str | None:
    if not choice or choice == NO_CALIBRATION:
        return None
    register_calibration_folder()
    path = folder_paths.get_full_path(CALIBRATION_KIND, choice)
    if path is None:
        raise SourceError(f"calibration file '{choice}' not found in models/{CALIBRATION_KIND}")
    return path


def linked_calibration(choice: str | None, override: str | None = None, part: str | None = None) -> str | None:
    """The calibration a converting node uses: a linked name (a capture node's output) wins over the dropdown. A
    capture of a CLIP with several encoders links `a_clip_l.safetensors, a_t5xxl.safetensors`: each part of Save CLIP
    (`part`: the encoder) takes the one named after it."""
    names = [n.strip() for n in (override or "").split(",") if n.strip()]
    if not names:
        return choice
    if len(names) == 1:
        return names[0]
    mine = [n for n in names if part and n.removesuffix(SAFETENSORS).endswith("_" + part)]
    if len(mine) == 1:
        return mine[0]
    raise SourceError(f"the linked calibration names {len(names)} files ({', '.join(names)}) and none is for "
                      f"{part or 'this model'}; capture from a CLIP with this encoder alone, or pick one file")


def loader_name(kind: str, widget_value: str, override: str | None) -> str:
    """The file a loader should open: a linked name (e.g. from the converter) wins over the dropdown.

    The converter returns names as loader dropdowns show them; a `<kind>/` prefix is accepted too.
    """
    name = (override or "").strip() or widget_value
    prefix = kind + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def full_path(kind: str, name: str) -> str:
    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.isfile(path):
        raise SourceError(f"model '{kind}/{name}' not found; put it into models/{kind} (or pick another file)")
    return path


def file_signature(*paths: str) -> str:
    """Size and modification time of files, so a rewritten file of the same name is loaded again."""
    parts = []
    for p in paths:
        st = os.stat(p)
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def output_folder(kind: str) -> str:
    """The folder of `kind` under ComfyUI's output directory (created on demand), else the kind's first folder."""
    out_root = os.path.realpath(folder_paths.get_output_directory())
    folders = folder_paths.get_folder_paths(kind)
    for folder in folders:
        if os.path.realpath(folder).startswith(out_root + os.sep):
            os.makedirs(folder, exist_ok=True)
            return folder
    if not folders:
        raise OutputNameError(f"ComfyUI has no folder for '{kind}'")
    os.makedirs(folders[0], exist_ok=True)
    return folders[0]


def checked_output_name(name: str) -> str:
    """Normalise a user-typed output name: forward slashes, `.safetensors` added, no way out of the folder."""
    name = (name or "").strip().replace("\\", "/")
    if not name:
        raise OutputNameError("the output name is empty")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise OutputNameError(f"output name '{name}' must be relative to the models folder, not an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OutputNameError(f"output name '{name}' may not contain empty, '.' or '..' path parts")
    if any(ch in name for ch in '\0:*?"<>|'):
        raise OutputNameError(f"output name '{name}' contains a character not allowed in file names")
    if not name.lower().endswith(SAFETENSORS):
        name += SAFETENSORS
    return name


def output_path(kind: str, name: str, overwrite: bool, why: str = "") -> tuple[str, str]:
    """(full path, name as loader dropdowns show it) for a converted file of `kind`.

    Refuses a name that exists in any folder of the kind unless `overwrite`; even then a same-named file in another
    folder would shadow ours in the dropdown, so that is refused too.
    """
    name = checked_output_name(name)
    folder = output_folder(kind)
    path = os.path.join(folder, *name.split("/"))
    real_folder = os.path.realpath(folder)
    if not os.path.realpath(path).startswith(real_folder + os.sep):
        raise OutputNameError(f"output name '{name}' leads outside {folder}")
    for other in folder_paths.get_folder_paths(kind):
        existing = os.path.join(other, *name.split("/"))
        if not os.path.exists(existing):
            continue
        if os.path.realpath(other) != real_folder:
            raise OutputNameError(f"'{name}' already exists in {other}; the loaders would open that file instead. "
                                  "Choose another output name.")
        if not overwrite:
            raise OutputNameError(f"'{name}' already exists in {folder}{why}; choose another output name or "
                                  "enable overwrite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path, name


def refresh_file_list(kind: str) -> None:
    """Drop ComfyUI's cached file list of `kind` so the next dropdown request sees the new file."""
    folder_paths.filename_list_cache.pop(kind, None)
