"""`glmc chat [--model DIR]`: a chat with history, /reset and /exit, streaming each reply (stdin may be piped)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from glmc.api import MessageTooLong
from glmc.errors import GlmcError
from glmc.runtime.chat_format import ReplyParser
from glmc.runtime.cli_generate import add_model_arguments, load_from_args, sampling_from_args

HELP = "type a message; /reset clears the history, /exit (or end of input) quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", nargs="?", default=None, help="a glmc build directory (same as --model BUILD)")
    p.add_argument("--system", default=None, help="a system message kept across /reset (ChatGLM3 / GLM-4)")
    add_model_arguments(p)


def reserve_for(model, max_new_tokens: int) -> int:
    """Tokens of the context kept free for each answer: --max-new-tokens, but at most half the context (a long
    history is worth more than room for an answer longer than the context allows anyway)."""
    return max(1, min(max_new_tokens, model.max_length // 2))


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """The chat loop: one line per message (stdin may be piped). The history is cut to what the model takes
    (Model.fit_messages: the oldest turns go first, and the chat says so); a message too long on its own, or a
    reply that fails, is reported and the chat goes on."""
    args.model = args.build or args.model
    stdin = stdin or sys.stdin
    model = load_from_args(args)
    sampling = sampling_from_args(args)
    reserve = reserve_for(model, sampling["max_new_tokens"])
    interactive = stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
        print(f"glmc chat with {model.path} ({model.tokenizer.family}): {HELP}")
    while True:
        if interactive:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
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
            history, dropped = model.fit_messages(history + [{"role": "user", "content": text}], reserve)
        except MessageTooLong as e:
            print(f"glmc chat: {e} (the chat goes on; the history is kept)", file=sys.stderr)
            continue
        if dropped:
            print(f"glmc chat: dropped the {dropped} oldest message(s) of the history to fit the model's prompt "
                  f"limit of {min(model.max_input_length, model.max_length - reserve)} tokens", file=sys.stderr)
        reply = ReplyParser(model.tokenizer)
        if interactive:
            sys.stdout.write("glm> ")
        try:
            for piece in model.stream(history, chat=True, reply=reply, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat; the exchange is forgotten
            print(" (interrupted)")
            history.pop()
            continue
        except GlmcError as e:  # this message failed; the chat goes on without it
            sys.stdout.write("\n")
            print(f"glmc chat: {e} (the chat goes on)", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append(reply.message)
    return 0
