"""Command line: ``python -m quant_core`` (also installed as ``scaled-fp16-convert``).

The first seven flags are a drop-in for the reference script ``convert_fp16_scaled_learned_svd_fast.py``, with the
same defaults and output naming. ``python -m quant_core capture ...`` records calibration statistics.
Exit status: 0 done, 2 bad input or cancelled (nothing written), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from tqdm import tqdm

from ._version import __version__
from .convert import convert_file
from .errors import Cancelled, ConversionError, safe_text
from .format import FP8_MARKER_REMOVED, default_output_path, strip_fp8_marker
from .options import ConvertOptions, OptionField, option_fields
from .report import format_summary

DEMO_FOLDER = "scaled-fp16-demo"  # --demo works in ./scaled-fp16-demo/

# Ctrl-C, `kill`/`docker stop` and a closed terminal all cancel the same way: the handler only records the signal;
# the conversion sees it at its next check (between tensors and inside long loops), removes its temporary files and
# the command prints one line and exits with status 2. Further signals while that happens change nothing.
CANCEL_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _SignalCancel:
    def __init__(self):
        self.event = threading.Event()
        self.name: str | None = None

    def __call__(self, signum, frame) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name
        self.event.set()

    def install(self) -> dict:
        """Handle the signals (main thread only); returns the previous handlers for `restore`."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self) for sig in CANCEL_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def cancel(self) -> bool:
        return self.event.is_set()

    @staticmethod
    def ignore() -> None:
        """Ignore the signals from now on: the interpreter's shutdown puts Python-level handlers back to the default
        (which kills the process) but leaves ignored signals ignored, so the tail of a burst cannot end the exit."""
        if threading.current_thread() is threading.main_thread():
            for sig in CANCEL_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


STRIP_COMMAND = "strip-fp8-marker"


def _add_option(p: argparse.ArgumentParser, f: OptionField) -> None:
    """A `ConvertOptions` field as a `--<name>` flag: booleans switch on, the rest take a value (same default)."""
    flag = f"--{f.name}"
    if f.type == "bool":
        p.add_argument(flag, action="store_true", help=f.help)
    elif f.default is None:
        p.add_argument(flag, metavar="FILE", help=f.help)
    else:
        p.add_argument(flag, type=int if f.type == "int" else str, default=f.default, choices=f.choices,
                       help=f"{f.help} (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quant_core",
        description="Convert a safetensors model to scaled FP16 (fp16 weights + power-of-two scale_weight) with "
                    "learned rounding on the fp16 grid. Subcommands: 'capture' records calibration statistics; "
                    f"'{STRIP_COMMAND}' rewrites a file of an earlier version without ComfyUI's scaled_fp8 marker.")
    p.add_argument("--input", help="input .safetensors file (pickle formats are refused)")
    p.add_argument("--output", help="output file (default: <input>_float16_scaled_learned[_nodistill]_svd.safetensors)")
    for f in option_fields():
        if f.cli:
            _add_option(p, f)
    p.add_argument("--scaled_fp8_marker", action="store_true", help=argparse.SUPPRESS)  # removed: refused
    p.add_argument("--report", metavar="FILE.json", help="write the full per-tensor report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--demo", action="store_true", help="build a small FLUX-shaped model (BF16 and FP32) in "
                   f"./{DEMO_FOLDER}/ and convert both (no download); the files stay there")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


class ProgressBar:
    """tqdm bar over the whole file by bytes, the current tensor in its postfix."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        if event["type"] == "start":
            self.bar = tqdm(total=event["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024,
                            desc="converting", dynamic_ncols=True)
        elif event["type"] == "tensor" and self.bar is not None:
            m = event["metrics"]
            post = f"{event['index']}/{event['total']} {event['action']} {safe_text(event['key'])}"
            if event["action"] == "quantized":
                post += f" err x{m['error_ratio']:.3f} vs RTN"
            self.bar.set_postfix_str(post, refresh=False)
            self.bar.update(event["bytes_done"] - self.bar.n)
        elif event["type"] == "done" and self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command line. As a program (`argv` None) the signals are ignored once the work is done, so that
    the rest of a burst of Ctrl-C cannot interrupt the exit; called with an explicit `argv` (from Python) the
    previous handlers are put back on return."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "capture":
        from .capture import main as capture_main
        return capture_main(argv[1:])
    if argv and argv[0] == STRIP_COMMAND:
        return _strip_fp8_marker(argv[1:])
    signals = _SignalCancel()
    previous = signals.install()
    try:
        return _main(argv, signals)
    except KeyboardInterrupt:  # only where no handler is installed (e.g. main() called from another thread)
        print("cancelled, no file written", file=sys.stderr)
        return 2
    finally:
        if as_program:
            signals.ignore()
        else:
            signals.restore(previous)


def _main(argv: list[str], signals: _SignalCancel) -> int:
    args = build_parser().parse_args(argv)
    args.signals = signals
    if args.scaled_fp8_marker:
        print(f"error: --scaled_fp8_marker: {FP8_MARKER_REMOVED}; to clean a file written with it: "
              f"python -m quant_core {STRIP_COMMAND} FILE --in-place", file=sys.stderr)
        return 2
    if args.demo:
        return _demo(args)
    if not args.input:
        build_parser().error("--input is required (or --demo)")
    return _convert(args, args.input, args.output, args.report)


def _convert(args, src: str, dst: str | None, report_path: str | None = None) -> int:
    options = ConvertOptions(**{f.name: getattr(args, f.name) for f in option_fields() if f.cli})
    bar = ProgressBar(args.quiet)
    try:
        report = convert_file(src, dst, options, on_event=bar, cancel=args.signals.cancel, report_path=report_path)
    except Cancelled as e:
        bar.close()
        print(f"{e} ({args.signals.name})" if args.signals.name else str(e), file=sys.stderr)
        return 2
    except ConversionError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bar.close()
        print("cancelled, no file written", file=sys.stderr)
        return 2
    for t in report.get("lossy", []):
        print(safe_text(f"warning: tensor '{t['key']}' is materially lossy ({t['reason']})"), file=sys.stderr)
    if not args.quiet:
        print(safe_text(f"wrote {os.path.abspath(dst) if dst else default_output_path(src, args.keep_distillation)}"))
        print(safe_text(format_summary(report), keep_newlines=True))
    return 0


def _demo(args) -> int:
    """Convert a small FLUX-shaped model twice: in BF16, as FLUX ships (exact in fp16: nothing to learn), and in FP32,
    as a training checkpoint would be (where the learned rounding has work to do). Everything stays in
    ./scaled-fp16-demo/ (made if missing; the demo's own files in it are replaced on a rerun)."""
    import argparse as _argparse

    import torch

    from .demo import demo_flux

    folder = os.path.abspath(DEMO_FOLDER)
    os.makedirs(folder, exist_ok=True)
    if not args.quiet:
        print(f"demo: working in {folder}")
    outputs = []
    for dtype, what, output in ((torch.bfloat16, "BF16, as FLUX ships", args.output),
                                (torch.float32, "FP32, as a training checkpoint would be", None)):
        src = demo_flux(folder, dtype)
        if not args.quiet:
            print(f"\ndemo: built a small FLUX-shaped model ({what}): {src} ({os.path.getsize(src) / 1e6:.1f} MB)")
        # the demo replaces its own outputs in its own folder; a --output elsewhere follows --overwrite
        run = _argparse.Namespace(**vars(args))
        run.overwrite = args.overwrite or output is None
        rc = _convert(run, src, output, args.report if dtype == torch.bfloat16 else None)
        if rc != 0:
            return rc
        outputs.append(output or default_output_path(src, args.keep_distillation))
    if not args.quiet:
        print("\ndemo: done. Files (source models and their scaled-FP16 versions) are kept in " + folder)
        for path in outputs:
            print(f"next: look at {path}")
        print("next: in ComfyUI, put a converted file into ComfyUI/models/diffusion_models/ and load it with "
              "'Load Diffusion Model (Scaled FP16)' (these demo weights are random: they load, they draw nothing)")
        print("next: convert your own model: python -m quant_core --input path/to/model.safetensors "
              "(or the 'Convert to Scaled FP16' node); the terms in the summary are explained in README.md, Glossary")
    return 0


def _strip_fp8_marker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"python -m quant_core {STRIP_COMMAND}",
        description="Rewrite a scaled-FP16 file written with the former --scaled_fp8_marker option without ComfyUI's "
                    "'scaled_fp8' marker (ComfyUI 0.8.0 and later cast every weight of such a file to fp8 in its "
                    "stock loaders). Everything else is copied byte for byte, one tensor at a time, into a temporary "
                    "file that is renamed into place at the end. Exit status 0 done, 2 bad input.")
    p.add_argument("file", help="the scaled-FP16 .safetensors file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help="write the cleaned file here (FILE is left as it is)")
    where.add_argument("--in-place", action="store_true", help="replace FILE itself (atomically: a crash or "
                       "cancel leaves the old file intact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = p.parse_args(argv)
    try:
        written = strip_fp8_marker(args.file, None if args.in_place else args.output, args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled, nothing changed", file=sys.stderr)
        return 2
    print(f"wrote {written} without the scaled_fp8 marker")
    return 0
