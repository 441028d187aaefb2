"""Forwarding the nodes' progress to ComfyUI: a progress bar, custom events for the web UI's panel, cancel.

`ConversionProgress`: the converter's events (a bar per tensor). `CaptureProgress`: the capture nodes (prompt or
sampling step i of n, tokens recorded, then a summary of each file written). Both send the same three events;
payloads follow docs/ARCHITECTURE.md ("ComfyUI custom events"). They are called from the thread that runs the node;
`PromptServer.send_sync` is safe to call from there.
"""

from __future__ import annotations

import json
import math
import time

import comfy.model_management
import comfy.utils
import server

from ..quant_core.errors import Cancelled
from ..quant_core.report import compact

PROGRESS_EVENT = "fp16lr.progress"
REPORT_EVENT = "fp16lr.report"
ERROR_EVENT = "fp16lr.error"


def _json_safe(value):
    """Plain JSON types only (non-finite floats become None), so the websocket encoder never fails mid-run."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def _add_passes_used(summary: dict, report: dict) -> None:
    """The most passes the learned rounding used on a tensor (`learned.passes_used_max`), from the per-tensor
    `iterations`, where the converter's report does not say it itself."""
    learned = summary.get("learned")
    if not isinstance(learned, dict) or learned.get("passes_used_max") is not None:
        return
    used = [t.get("iterations") for t in report.get("tensors", [])
            if t.get("method") in ("topk", "gptq") and isinstance(t.get("iterations"), int) and t["iterations"] > 0]
    if used:
        learned["passes_used_max"] = max(used)


def _add_per_tensor_error(summary: dict, report: dict) -> None:
    """Median and worst relative error over the quantized tensors (`rel_error_per_tensor`), from the per-tensor rows,
    where the converter's report does not give them: the size-weighted total can be dominated by one huge tensor."""
    if summary.get("rel_error_per_tensor") is not None:
        return
    rows = [t for t in report.get("tensors", []) if isinstance(t.get("rel_error"), (int, float))
            and math.isfinite(t["rel_error"])]
    if not rows:
        return
    errors = sorted(t["rel_error"] for t in rows)
    n = len(errors)
    median = errors[n // 2] if n % 2 else 0.5 * (errors[n // 2 - 1] + errors[n // 2])
    worst = max(rows, key=lambda t: t["rel_error"])
    summary["rel_error_per_tensor"] = {"median": median, "worst": worst["rel_error"], "worst_key": worst["key"]}


class NodeEvents:
    """A node's link to the pack's panel: the custom events, addressed to the node; an error or a cancel."""

    unit = "tensor"  # what `index`/`total` count, in the error event

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self.index: int | None = None
        self.total: int | None = None

    def cancel(self) -> None:
        """Raises ComfyUI's interrupt exception once the user pressed Cancel (the UI's interrupt)."""
        comfy.model_management.throw_exception_if_processing_interrupted()

    def failed(self, error: BaseException) -> None:
        cancelled = isinstance(error, (comfy.model_management.InterruptProcessingException, Cancelled))
        message = "cancelled, no file written" if cancelled else str(error) or type(error).__name__
        self._send(ERROR_EVENT, {"message": message, "cancelled": cancelled, "index": self.index,
                                 "total": self.total, "unit": self.unit}, with_prompt=False)

    def _send(self, event_name: str, payload: dict, with_prompt: bool = True) -> None:
        instance = getattr(server.PromptServer, "instance", None)
        if instance is None:
            return
        data = {"node": self.node_id}
        if with_prompt:
            data["prompt_id"] = getattr(instance, "last_prompt_id", None)
        data.update(payload)
        data = _json_safe(data)
        json.dumps(data)  # fail here, in the node, rather than in the server's send loop
        instance.send_sync(event_name, data, getattr(instance, "client_id", None))


class ConversionProgress(NodeEvents):
    """One conversion's link to the UI. Pass `on_event` and `cancel` to `convert_file`.

    `steps_before`/`steps_total` let a node that converts several parts in a row (a CLIP's encoders) show one bar
    over all of them, in tensors.
    """

    def __init__(self, node_id: str | None, steps_before: int = 0, steps_total: int | None = None):
        super().__init__(node_id)
        self.bar: comfy.utils.ProgressBar | None = None
        self.steps_before = steps_before
        self.steps_total = steps_total

    # --- called by quant_core.convert_file ---------------------------------------------------------------

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "start":
            self.total = event["total"]
            self._bar().update_absolute(self.steps_before, self._bar_total())
        elif kind == "tensor":
            self.index, self.total = event["index"], event["total"]
            self._bar().update_absolute(self.steps_before + self.index, self._bar_total())
            self._send(PROGRESS_EVENT, {"event": event})

    # --- called by the nodes ---------------------------------------------------------------------------------

    def finished(self, report: dict, output_name: str, extra: dict | None = None) -> dict:
        """Send the report (plus `extra` fields); returns the summary for the node's `ui` output."""
        summary = _json_safe({**compact(report), **(extra or {})})
        summary["output_name"] = output_name
        _add_passes_used(summary, report)
        _add_per_tensor_error(summary, report)
        self._send(REPORT_EVENT, {"report": summary})
        return summary

    def reused(self, summary: dict, output_name: str) -> dict:
        """An up-to-date file is returned instead of converting again: send its stored report, marked as such."""
        summary = _json_safe({**summary, "output_name": output_name, "up_to_date": True})
        self._send(REPORT_EVENT, {"report": summary})
        return summary

    # --- internals -----------------------------------------------------------------------------------------

    def _bar_total(self) -> int:
        return max(1, self.steps_total if self.steps_total else self.steps_before + (self.total or 0))

    def _bar(self) -> comfy.utils.ProgressBar:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(self._bar_total(), node_id=self.node_id)
        return self.bar


class CaptureProgress(NodeEvents):
    """A capture node's link to the UI: `step` after each prompt or sampling step (`unit` "prompt" or "step"),
    `finished` with the summary of each calibration file written (`capture_summary`). ComfyUI's own bar is the
    node's business (the prompts node drives one, the sampler its own)."""

    def __init__(self, node_id: str | None, unit: str, total: int, layers: int, what: str):
        super().__init__(node_id)
        self.unit = unit
        self.total = total
        self.layers = layers  # Linear layers being recorded
        self.what = what  # the encoder(s) or "model"
        self.started = time.monotonic()

    def step(self, index: int, tokens: list[dict], held_out: bool = False) -> None:
        """`index` of `total` done; `tokens`: per recorded part {"name", "tokens" (fit + check), "held_out"}."""
        self.index = index
        self._send(PROGRESS_EVENT, {"event": {
            "type": "capture", "unit": self.unit, "index": index, "total": self.total, "held_out": held_out,
            "tokens": tokens, "layers": self.layers, "what": self.what,
            "elapsed_s": time.monotonic() - self.started}})

    def finished(self, summary: dict) -> dict:
        """Send one file's summary; returns it (JSON-safe) for the node's `ui` output."""
        summary = _json_safe({**summary, "kind": "capture", "seconds": time.monotonic() - self.started})
        self._send(REPORT_EVENT, {"report": summary})
        return summary
