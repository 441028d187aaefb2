"""``python -m quant_core capture``: record per-layer input statistics of a transformers model from text files.

    python -m quant_core capture --model DIR --text calib.txt [--eval-text heldout.txt] --output calib.safetensors

Every ``torch.nn.Linear`` of the model gets a forward pre-hook that adds its input rows (padding excluded) to the
bounded-memory statistics of `calibration.CalibrationWriter` (``--rows`` per layer within ``--budget-gb``);
layers that read the very same tensor (q/k/v projections) share one group. Each non-empty line of a text file is
one sequence (truncated to --max-length tokens); the
even-numbered sequences also go into the fit half (see calibration.py). The model loads offline from a local folder
and only from safetensors weights (a pickled ``pytorch_model.bin`` is never loaded); transformers is imported only
here.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .calibration import DEFAULT_BUDGET_BYTES, DEFAULT_ROWS, CalibrationError, CalibrationWriter
from .errors import safe_text


class CaptureError(Exception):
    """Unusable input to `capture`; the message names the file or folder."""


def check_model_folder(model_dir: str) -> None:
    """A local transformers folder with safetensors weights (a pickled checkpoint is never loaded)."""
    if not os.path.isdir(model_dir):
        raise CaptureError(f"{model_dir}: not a folder (expected a local transformers model folder)")
    names = os.listdir(model_dir)
    if "config.json" not in names:
        raise CaptureError(f"{model_dir}: no config.json (expected a local transformers model folder)")
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        other = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" (found {', '.join(sorted(other)[:3])}: pickled weights are never loaded)" if other else ""
        raise CaptureError(f"{model_dir}: no safetensors weights{hint}; convert the model to safetensors first")


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class _Recorder:
    """Forward pre-hooks on every Linear: group by input tensor, add the unmasked rows to the writer."""

    def __init__(self, model: torch.nn.Module, writer: CalibrationWriter, parts: int = 2, calls: int | None = None):
        self.writer = writer
        self.parts = parts  # statistics per group the writer's budget is planned for (2: fit half + rest, 3: + eval)
        self.calls = calls  # most forwards the model will make, where the caller knows it (a sampling run): a group
        # gets at most its rows of the first forward times this, and the budget reserves no more for it
        self.mask: torch.Tensor | None = None
        # [batch] bool: sequences of the fit half; or one bool for every row of the batch (a prompt, a model call)
        self.fit: torch.Tensor | bool | None = None
        self.held_out = False
        self.max_tokens: int | None = None
        # input tensor identity -> (group, tensor) within one forward; holding the tensor keeps its memory from
        # being reused by another tensor (which would then look identical)
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._group_of: dict[str, str] = {}  # module name -> group (fixed by the first forward)
        self._skip: set[str] = set()
        self._handles = []
        self._widths: dict[str, int] = {}
        self._replanned = False
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                writer.add_layer(f"{name}.weight", name, mod.bias is not None)
                self._widths[name] = mod.in_features
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        # every Linear its own group until the first forward shows which share an input: a plan on the safe side,
        # made exact (rows grow back) once the groups are known
        plan = getattr(writer, "plan", None)  # a stand-in writer (e.g. one that forwards rows) may have none
        if plan is not None:
            plan(self._widths, parts)

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0]
            ident = (x.data_ptr(), tuple(x.shape), x.stride())
            group = self._group_of.get(name)
            if group is None:
                group = self._seen.get(ident, (name, None))[0]
                self._group_of[name] = group
                self.writer.layers[f"{name}.weight"]["group"] = group
            if group != name or ident in self._seen:  # the group's owner already recorded this tensor
                return
            self._seen[ident] = (group, x)
            rows = x.detach()
            whole = self.fit is True  # the whole batch belongs to the fit half
            if self.mask is not None and rows.dim() == 3 and rows.shape[:2] == self.mask.shape:
                mask = self.mask.bool()
                if self.held_out or not isinstance(self.fit, torch.Tensor):
                    self.writer.add(group, rows[mask], held_out=self.held_out, fit=whole)
                else:
                    fit = self.fit.to(mask.device)[:, None]
                    for part, sel in ((True, mask & fit), (False, mask & ~fit)):
                        if bool(sel.any()):
                            self.writer.add(group, rows[sel], fit=part)
                return
            self.writer.add(group, rows.reshape(-1, rows.shape[-1]), held_out=self.held_out, fit=whole)
        return hook

    def new_batch(self, mask: torch.Tensor | None, fit: torch.Tensor | bool | None = None) -> None:
        """Before (or after) a forward: `mask` [batch, tokens] marks the rows to record (None: all), `fit` the fit
        half (see `self.fit`). The first call after a forward re-plans the writer's rows for the real groups."""
        if not self._replanned and self._group_of:
            self._replanned = True
            groups = {g: self._widths[g] for g in set(self._group_of.values()) if g in self._widths}
            if getattr(self.writer, "plan", None) is not None:
                if self.calls:
                    first = self.writer.counts()
                    caps = {g: max(1, first.get(g, 0)) * self.calls for g in groups}
                    self.writer.plan(groups, self.parts, caps=caps)
                else:
                    self.writer.plan(groups, self.parts)
        self.mask = mask
        self.fit = fit
        self._seen.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def capture(model_dir: str, texts: list[str], output: str, eval_texts: list[str] | None = None,
            max_length: int = 128, batch_size: int = 16, max_tokens: int | None = None,
            device: str = "cpu", progress=None, rows: int | None = DEFAULT_ROWS,
            budget_bytes: int | None = DEFAULT_BUDGET_BYTES, on_note=None) -> dict:
    """Record calibration statistics of the transformers model in `model_dir` on `texts` (held-out statistics on
    `eval_texts` if given) and write them to `output`. `max_tokens` caps the calibration tokens (whole sequences).
    `rows` / `budget_bytes`: see `CalibrationWriter` (lines about lowered rows go to `on_note`). Returns the file's
    metadata summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model_folder(model_dir)
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).float().eval().to(device)
    writer = CalibrationWriter(rows=rows, budget_bytes=budget_bytes, on_note=on_note)
    rec = _Recorder(model, writer, parts=3 if eval_texts else 2)
    counts = {}
    try:
        for held_out, lines in ((False, texts), (True, eval_texts or [])):
            rec.held_out = held_out
            tokens = 0
            for i in range(0, len(lines), batch_size):
                if not held_out and max_tokens is not None and tokens >= max_tokens:
                    break
                batch = tok(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
                first = torch.arange(i, i + batch["attention_mask"].shape[0])
                rec.new_batch(batch["attention_mask"], first % 2 == 0)
                with torch.no_grad():
                    model(**batch)
                tokens += int(batch["attention_mask"].sum())
                if progress is not None:
                    progress(held_out, tokens)
            counts["eval_tokens" if held_out else "tokens"] = tokens
    finally:
        rec.close()
    source = {"model": os.path.basename(os.path.normpath(model_dir)), "max_length": max_length,
              "sequences": len(texts), "eval_sequences": len(eval_texts or []), **counts,
              "rows": writer.rows if rows is not None else None}
    writer.save(output, source)
    return source


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quant_core capture",
                                description="Record per-layer input statistics (mean and Gram matrix of every "
                                            "Linear layer's input) of a transformers model for calibrated rounding "
                                            "and bias correction.")
    p.add_argument("--model", required=True, help="local folder of a transformers model (loaded offline)")
    p.add_argument("--text", required=True, help="calibration text, one sequence per non-empty line")
    p.add_argument("--eval-text", help="held-out text (disjoint from --text) for held-out error figures")
    p.add_argument("--output", required=True, help="calibration file to write (.safetensors)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, help="stop after about this many calibration tokens")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                   help=f"activation rows (directions) the statistics keep per layer (default {DEFAULT_ROWS}); at or "
                        "above a layer's input width its statistics are exact")
    p.add_argument("--budget-gb", type=float, default=DEFAULT_BUDGET_BYTES / 1e9,
                   help="memory the statistics may hold, in GB (default %(default)s); also bounds the file size. "
                        "Fewer rows are kept where the requested ones do not fit (a line says so)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for path in (args.model, args.text, args.eval_text):
        if path and not os.path.exists(path):
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
    texts = read_lines(args.text)
    if not texts:
        print(f"error: {args.text}: no text", file=sys.stderr)
        return 2
    eval_texts = read_lines(args.eval_text) if args.eval_text else None
    try:
        check_model_folder(args.model)
        if args.rows < 1 or not args.budget_gb > 0:
            raise CaptureError(f"--rows must be at least 1 and --budget-gb above 0 (got {args.rows}, {args.budget_gb})")
        src = capture(args.model, texts, args.output, eval_texts, args.max_length, args.batch_size, args.max_tokens,
                      args.device, rows=args.rows, budget_bytes=int(args.budget_gb * 1e9),
                      on_note=lambda line: print(f"note: {safe_text(line)}", file=sys.stderr))
    except (CaptureError, CalibrationError) as e:
        print(f"error: {safe_text(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {src.get('tokens', 0)} calibration tokens"
          + (f", {src.get('eval_tokens', 0)} held-out tokens" if eval_texts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
