"""`glmc chat [--model DIR]`: a chat with history, /reset and /exit, streaming each reply (stdin may be piped)."""

from __future__ import annotations

import argparse
import sys

from glmc.errors import GlmcError
from glmc.runtime.chat_format import ReplyParser
from glmc.runtime.cli_generate import add_model_arguments, load_from_args, sampling_from_args

HELP = "type a message; /reset clears the history, /exit (or end of input) quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", nargs="?", default=None, help="a glmc build directory (same as --model BUILD)")
    p.add_argument("--system", default=None, help="a system message kept across /reset (ChatGLM3 / GLM-4)")
    add_model_arguments(p)


def fit(model, history: list[dict]) -> list[dict]:
    """Drop the oldest user/assistant exchanges until the prompt leaves room for an answer."""
    history = list(history)
    while len(model.prompt_ids(history, chat=True)) >= model.max_length:
        first = next(i for i, m in enumerate(history) if m["role"] != "system")
        if first >= len(history) - 2:  # only the new message is left
            raise GlmcError(f"this message does not fit the model's context of {model.max_length} tokens; "
                            "send a shorter one")
        del history[first:first + 2]
    return history


def run(args: argparse.Namespace) -> int:
    args.model = args.build or args.model
    model = load_from_args(args)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
        print(f"glmc chat with {model.path} ({model.tokenizer.family}): {HELP}")
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(history cleared)")
            continue
        if text.startswith("/"):
            print(f"glmc chat: unknown command {text}; {HELP}", file=sys.stderr)
            continue
        try:
            history = fit(model, history + [{"role": "user", "content": text}])
        except GlmcError as e:
            print(f"glmc chat: {e}", file=sys.stderr)
            continue
        reply = ReplyParser(model.tokenizer)
        if interactive:
            sys.stdout.write("glm> ")
        try:
            for piece in model.stream(history, chat=True, reply=reply, **sampling_from_args(args)):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat; the exchange is forgotten
            print(" (interrupted)")
            history.pop()
            continue
        sys.stdout.write("\n")
        history.append(reply.message)
    return 0
