"""`glmc generate [--model DIR] "prompt"`: stream one answer; also the model and sampling flags `glmc chat` shares."""

from __future__ import annotations

import argparse
import sys

from glmc.errors import GlmcError
from glmc.runtime.generate import SamplingConfig

_DEFAULTS = SamplingConfig()

# flag -> (type, help); each maps to the SamplingConfig field of the same name
SAMPLING_FLAGS: dict[str, tuple[type, str]] = {
    "max_new_tokens": (int, "most tokens to generate"),
    "temperature": (float, "0 = greedy"),
    "top_k": (int, "sample from the k most likely tokens (0 = all)"),
    "top_p": (float, "sample from the smallest set of tokens holding this probability mass"),
    "repetition_penalty": (float, "> 1 discourages tokens already seen"),
    "seed": (int, "random seed for sampling"),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (default: the model shipped with glmc)")
    p.add_argument("--family", choices=("chatglm2", "chatglm3", "glm4"), default=None,
                   help="model family, when the checkpoint does not say")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    for name, (kind, help_text) in SAMPLING_FLAGS.items():
        default = getattr(_DEFAULTS, name)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                       help=f"{help_text} (default: {default})")


def sampling_from_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SAMPLING_FLAGS}


def load_from_args(args: argparse.Namespace):
    """The model a command runs: one function, so other backends and build directories plug in here."""
    from glmc.api import load
    return load(args.model, family=args.family, dtype=args.dtype, device=args.device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    p.add_argument("--system", default=None, help="a system message (ChatGLM3 / GLM-4 chat template)")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.raw and args.system:
        raise GlmcError("--system needs the chat template; drop --raw or --system")
    model = load_from_args(args)
    if args.raw:
        prompt = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    for piece in model.stream(prompt, chat=not args.raw, **sampling_from_args(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
