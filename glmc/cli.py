"""The `glmc` command line: compile | inspect | verify | generate | run | chat | bench | eval | quantize."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from glmc.errors import GlmcError

# command -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("glmc.runtime.cli_generate", "generate text from a checkpoint directory (default: the shipped model)"),
    "compile": ("glmc.compiler.cli_compile",
                "compile a YAML config into a verified build directory (ONNX, ONNX Runtime, TensorRT)"),
    "inspect": ("glmc.compiler.cli_inspect", "show what a build directory holds and how it was verified"),
    "run": ("glmc.runtime.cli_run",
            "generate on a compiled build (ONNX Runtime, TensorRT or torch; batches, streaming)"),
    "bench": ("glmc.runtime.cli_bench", "time to first token, prefill and decode tokens/s, peak memory of a build"),
    "chat": ("glmc.runtime.cli_chat", "chat interactively (history, /reset, /exit; default: the shipped model)"),
    "verify": ("glmc.export.cli_verify", "check each ONNX lowering in ONNX Runtime against the torch model"),
    "eval": ("glmc.quantization.cli_eval",
             "accuracy table of precisions (fp16, int8, int4, kv8...) against fp32 on held-out text"),
    "serve": ("glmc.serve.cli_serve", "an OpenAI-compatible HTTP server with in-flight batching and a chat page"),
    "quantize": ("glmc.quantization.cli_quantize", "write a weight-only int8/int4 (+ int8 KV cache) checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmc",
        description="Turn ChatGLM2/ChatGLM3/GLM-4 checkpoints into verified ONNX Runtime and TensorRT engines, "
                    "and run them. Every command defaults to the small model shipped in the package.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
        importlib.import_module(module).add_arguments(p)
    return parser


def _os_message(e: OSError) -> str:
    """An OSError as one line naming the file: 'PATH: the disk is full', 'PATH: Permission denied'."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the filesystem is read-only"}.get(e.errno or 0, e.strerror or str(e))
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {why}" if where else why


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr naming what is at fault, with a nonzero exit: 2 for
    errors a user can act on (GlmcError: a file, key or argument named), 1 for anything else; `--debug` adds the
    traceback."""
    args = build_parser().parse_args(argv)
    name = f"glmc {args.command}"
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `glmc run ... | head`: the reader left
        sys.stderr.close()
        return 1
    except Exception as e:  # noqa: BLE001 - the one error path: a line, not a traceback (unless --debug)
        if getattr(args, "debug", False):
            traceback.print_exception(e)
        code, message = _message(e)
        print(f"{name}: {message}", file=sys.stderr)
        return code


def _message(e: Exception) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for errors a user can act on (a GlmcError names the file, key or
    argument; an OSError its file), 1 for anything else (a bug: the line says to rerun with --debug)."""
    if isinstance(e, GlmcError):
        return 2, f"error: {e}"
    if isinstance(e, OSError):
        return 2, f"error: {_os_message(e)}"
    text = " ".join(str(e).split()) or "(no message)"
    return 1, f"internal error: {type(e).__name__}: {text[:500]} (rerun with --debug for the traceback, and report it)"


def cli() -> None:
    """The `glmc` command: main(), exiting with its code. An interrupted command (130) ends with os._exit once its
    cleanup has run: a KeyboardInterrupt that passed through Python code run from C (a library's PyRun_String)
    marks the interpreter, which then kills itself with SIGINT at exit although main handled it (measured: 1 in 6
    interrupted compiles exited -2 instead of 130 under load)."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    cli()
