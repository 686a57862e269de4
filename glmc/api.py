"""The embedded API: `glmc.load(dir)` -> a model that generates, streams and chats in text.

    import glmc
    model = glmc.load()                      # the shipped model; or glmc.load("path/to/chatglm3-6b")
    print(model.generate("def main(", max_new_tokens=20))
    print(model.chat([{"role": "user", "content": "Hello"}], temperature=0.8, top_p=0.8, seed=0))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from glmc.artifact import open_build
from glmc.assets import model_dir
from glmc.errors import GlmcError
from glmc.modeling_patches.tokenizer import Tokenizer, load_tokenizer
from glmc.runtime.chat_format import ReplyParser, chat_prompt, raw_prompt, stop_ids
from glmc.runtime.generate import Backend, SamplingConfig, generate, stream
from glmc.runtime.loader import make_backend

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingConfig) if f.name != "stop_token_ids")

# A prompt: text, token ids (used as given), or chat messages ({"role", "content", ...} dicts).
Prompt = str | Sequence[int] | Sequence[dict]


def _is_messages(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], dict)


class ArgumentError(GlmcError, TypeError):
    """An API argument of the wrong type or value: a GlmcError (one line naming the argument) and a TypeError."""


class MessageTooLong(GlmcError):
    """The newest chat message alone (with the system messages) does not fit the model's prompt limit."""

    def __init__(self, message: str, tokens: int, limit: int):
        super().__init__(message)
        self.tokens, self.limit = tokens, limit


def _check_messages(messages: object, name: str = "messages") -> list[dict]:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ArgumentError(f"{name}: expected a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ArgumentError(f"{name}[{i}]: expected a {{'role': str, 'content': str}} dict, got {m!r:.80}")
    return list(messages)


class Model:
    """A tokenizer and a backend: text in, text out."""

    def __init__(self, path: Path, tokenizer: Tokenizer, backend: Backend):
        self.path = path
        self.tokenizer = tokenizer
        self.backend = backend

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    @property
    def max_input_length(self) -> int:
        """The longest prompt the model takes (a build's max_input_length; else its context)."""
        return int(getattr(self.backend, "max_input_length", None) or self.backend.max_length)

    @property
    def vocab_size(self) -> int:
        be = self.backend
        config = getattr(getattr(be, "model", None), "config", None)
        return int(getattr(be, "vocab_size", None) or getattr(config, "vocab_size", None) or self.tokenizer.vocab_size)

    def prompt_ids(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Text -> the raw prompt (prefix tokens + text) or, with chat, a one-message chat; messages -> chat;
        token ids are used as given (each checked against the vocabulary)."""
        if isinstance(prompt, str):
            if chat:
                return chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
            return raw_prompt(self.tokenizer, prompt)
        if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, Sequence):
            raise ArgumentError(f"prompt: expected text, a list of token ids or a list of chat messages, not "
                                f"{type(prompt).__name__}")
        if _is_messages(prompt):
            return chat_prompt(self.tokenizer, _check_messages(prompt, "prompt"))
        vocab = self.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ArgumentError(f"prompt[{i}]: token ids are integers, not {type(t).__name__} ({t!r:.40})")
            if not 0 <= t < vocab:
                raise ArgumentError(f"prompt[{i}]: token id {t} is outside the vocabulary (0..{vocab - 1})")
        return [int(t) for t in prompt]  # type: ignore[arg-type]  # (checked above)

    def fit_messages(self, messages: Sequence[dict], reserve: int = 1) -> tuple[list[dict], int]:
        """The chat history policy (`glmc chat`'s, offered to the server): (the newest messages that fit, how many
        were dropped). The prompt must be at most max_input_length tokens and leave `reserve` tokens of the context
        (max_length) for the answer. System messages always stay; the oldest turns go first, a turn being a user
        message with what follows it up to the next user message. The last message is never dropped: when it
        alone (with the system messages) does not fit, MessageTooLong says by how much, and nothing changes."""
        msgs = _check_messages(messages)
        if not isinstance(reserve, int) or isinstance(reserve, bool) or not 0 <= reserve < self.max_length:
            raise ArgumentError(f"reserve={reserve!r}: expected an integer from 0 to {self.max_length - 1} (the "
                                "tokens kept free for the answer)")
        if not msgs:
            raise ArgumentError("messages: expected at least one message")
        limit = min(self.max_input_length, self.max_length - reserve)
        dropped = 0
        while (n := len(chat_prompt(self.tokenizer, msgs))) > limit:
            first = next((i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
            if first is None:  # only system messages and the newest one are left
                why = (f"the build's max_input_length of {self.max_input_length}" if limit == self.max_input_length
                       else f"the {limit} tokens the context of {self.max_length} leaves after {reserve} for the "
                            "answer")
                raise MessageTooLong(f"this message makes a prompt of {n} tokens (with the chat template"
                                     f"{' and the system message' if len(msgs) > 1 else ''}), over {why}; send a "
                                     "shorter one", n, limit)
            end = first + 1
            while end < len(msgs) - 1 and msgs[end]["role"] not in ("user", "system"):
                end += 1
            dropped += end - first
            del msgs[first:end]
        return msgs, dropped

    def sampling(self, prompt_len: int, **sampling) -> SamplingConfig:
        """Sampling settings with the family's stop ids; max_new_tokens is cut to what the context has left."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ArgumentError(f"unknown sampling option '{unknown[0]}' (known: {', '.join(SAMPLING_KEYS)})")
        cfg = SamplingConfig(**sampling, stop_token_ids=stop_ids(self.tokenizer))
        room = self.max_length - prompt_len
        if room <= 0:
            raise GlmcError(f"the prompt is {prompt_len} tokens but the model's context is {self.max_length} tokens "
                            f"({self.path}); shorten the prompt")
        return dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room))

    def _stream_ids(self, ids: list[int], cfg: SamplingConfig) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        stops = set(cfg.stop_token_ids)
        for (token,) in stream(self.backend, [ids], cfg, self.tokenizer.pad_id):
            if token is None or token in stops:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def stream(self, prompt: Prompt, chat: bool = False, reply: ReplyParser | None = None,
               **sampling) -> Iterator[str]:
        """Yield the answer's text as it is generated. With chat, the reply's metadata line is held back
        (pass a ReplyParser as `reply` to read it, and the whole reply message, afterwards)."""
        chat = chat or _is_messages(prompt)
        ids = self.prompt_ids(prompt, chat)
        cfg = self.sampling(len(ids), **sampling)
        if not chat:
            yield from self._stream_ids(ids, cfg)
            return
        parser = reply or ReplyParser(self.tokenizer)
        for piece in self._stream_ids(ids, cfg):
            shown = parser.feed(piece)
            if shown:
                yield shown
        tail = parser.finish()
        if tail:
            yield tail

    def generate(self, prompt: Prompt, chat: bool = False, **sampling) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(prompt, chat=chat, **sampling))

    def chat(self, messages: Sequence[dict], **sampling) -> str:
        """The assistant's reply (content only) to a list of messages."""
        return self.generate(_check_messages(messages), chat=True, **sampling)

    def generate_batch(self, prompts: Sequence[Prompt], chat: bool = False, **sampling) -> list[str]:
        """Several prompts in one left-padded batch; one answer each (raw text, no reply parsing)."""
        ids = [self.prompt_ids(p, chat) for p in prompts]
        cfg = self.sampling(max(len(i) for i in ids), **sampling)
        out = generate(self.backend, ids, cfg, self.tokenizer.pad_id)
        return [self.tokenizer.decode(row) for row in out]


def check_tokenizer(where: Path, tokenizer: Tokenizer, family: str | None, vocab_size: int | None) -> None:
    """A tokenizer must belong to the model it feeds: same family, no id past the model's vocabulary."""
    if family is not None and family != tokenizer.family:
        raise GlmcError(f"{where}: the model is a {family} model but {tokenizer.path} is a {tokenizer.family} "
                        "tokenizer; name the family explicitly if the guess is wrong")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise GlmcError(f"{where}: {tokenizer.path} has {tokenizer.vocab_size} ids (with special tokens) but the "
                        f"model's vocabulary has only {vocab_size}")


def _check_load_arguments(**args: object) -> None:
    """glmc.load's arguments typed, named when not (ArgumentError: a GlmcError and a TypeError)."""
    kinds: dict[str, tuple[type, ...]] = {
        "path": (str, Path), "family": (str,), "dtype": (str,), "device": (str,), "backend": (str,),
        "target": (str,), "max_length": (int,), "max_batch": (int,), "threads": (int,)}
    for name, value in args.items():
        if value is None and name not in ("device", "backend", "threads"):
            continue
        if not isinstance(value, kinds[name]) or isinstance(value, bool):
            want = " or ".join(k.__name__ for k in kinds[name])
            raise ArgumentError(f"glmc.load: {name}={value!r:.60} must be {want}, not {type(value).__name__}")
        low = {"max_length": 1, "max_batch": 1, "threads": 0}.get(name)
        if low is not None and isinstance(value, int) and value < low:
            raise ArgumentError(f"glmc.load: {name}={value} is out of range")


def load(path: str | Path | None = None, family: str | None = None, dtype: str | None = None, device: str = "cpu",
         max_length: int | None = None, backend: str = "auto", target: str | None = None,
         max_batch: int | None = None, threads: int = 0, tensor_parallel: int | None = None, **options) -> Model:
    """The one place that turns a path into a runnable model: a build directory (manifest.json), one lowered ONNX
    model (`.../onnx/<target>/model.onnx` or its folder: that graph, or a refusal), or a checkpoint directory
    (default: the shipped model). `backend`: auto | torch | onnxruntime | tensorrt | cuda (glmc.runtime.loader.pick);
    `dtype` (torch backend): the checkpoint's own by default for builds on CUDA, else float32. `tensor_parallel` N > 1
    (default: the build's parallel.tensor) runs the torch backend split over N processes (glmc.parallel)."""
    _check_load_arguments(path=path, family=family, dtype=dtype, device=device, max_length=max_length,
                          backend=backend, target=target, max_batch=max_batch, threads=threads)
    build = open_build(model_dir(path) if path is None or not str(path).endswith(".onnx") else path)
    from glmc.parallel.backend import start_build
    be = start_build(build, tensor_parallel, backend, device, max_length, max_batch, dtype, threads)
    if be is None:
        be = make_backend(build, backend, device, target, max_length, max_batch, threads, dtype, **options)
    tokenizer = load_tokenizer(build.tokenizer_dir, family or build.family)
    model = getattr(be, "model", None)
    arch = getattr(model, "config", None)
    check_tokenizer(build.root, tokenizer, family or build.family or getattr(arch, "family", None),
                    getattr(arch, "vocab_size", None) or getattr(be, "vocab_size", None))
    return Model(build.root, tokenizer, be)
