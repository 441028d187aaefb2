"""Up to date: a converted file made from the same source with the same settings is not converted again.

Beside each file the converter node writes, a record (`<file>.report.json`) keeps the source's name, size and mtime,
the byte-affecting settings, the calibration file's size and mtime, the output's own size and mtime, and the report
shown in the panel. A later run with all of these unchanged returns that report instead of converting.
"""

from __future__ import annotations

import json
import os

from ..quant_core.safetensors_io import read_header

RECORD_SUFFIX = ".report.json"  # beside the output; ComfyUI's model lists show .safetensors files only
RECORD_FORMAT = "scaled_fp16.record"
# settings that change the report only, never the file's bytes
REPORT_ONLY_SETTINGS = ("calib_samples",)


def record_path(output: str) -> str:
    return output + RECORD_SUFFIX


def _stat(path: str | None) -> dict | None:
    if not path:
        return None
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def byte_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in REPORT_ONLY_SETTINGS}


def write_record(output: str, source: str, settings: dict, calibration: str | None, summary: dict) -> None:
    """Remember what `output` was made from, and its report (written after the output is in place)."""
    record = {"format": RECORD_FORMAT, "version": 1, "source": {"name": os.path.basename(source), **_stat(source)},
              "calibration": _stat(calibration), "settings": byte_settings(settings), "output": _stat(output),
              "report": summary}
    tmp = record_path(output) + ".partial"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, record_path(output))


def _setting_changes(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def up_to_date(output: str, source: str, settings: dict, calibration: str | None) -> tuple[dict | None, str]:
    """(stored report, "") when `output` exists, is the file our record describes (size, mtime) and was made from
    `source` as it is now (size, mtime; the file's own metadata names the same source and settings) with the same
    byte-affecting settings; else (None, why not)."""
    try:
        with open(record_path(output)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, " (no record of what it was made from)"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None, " (no record of what it was made from)"
    if record.get("output") != _stat(output):
        return None, " (it changed after it was converted)"
    src = record.get("source") or {}
    if src.get("name") != os.path.basename(source) or {k: src.get(k) for k in ("size", "mtime_ns")} != _stat(source):
        return None, f" (made from another source or an older {os.path.basename(source)})"
    wanted = byte_settings(settings)
    changes = _setting_changes(record.get("settings") or {}, wanted)
    if changes:
        return None, f" (made with other settings: {', '.join(changes)})"
    if record.get("calibration") != _stat(calibration):
        return None, " (made with another calibration file)"
    try:
        meta = read_header(output).metadata or {}
        stored = byte_settings(json.loads(meta.get("scaled_fp16.settings", "{}")))
    except Exception:  # noqa: BLE001 - a damaged file is simply not up to date
        return None, " (its header cannot be read)"
    if meta.get("scaled_fp16.source") != os.path.basename(source) or _setting_changes(stored, wanted):
        return None, " (its metadata names another source or other settings)"
    report = record.get("report")
    return (report, "") if isinstance(report, dict) else (None, " (no stored report)")
