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


class Model:
    """A tokenizer and a backend: text in, text out."""

    def __init__(self, path: Path, tokenizer: Tokenizer, backend: Backend):
        self.path = path
        self.tokenizer = tokenizer
        self.backend = backend

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    def prompt_ids(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Text -> the raw prompt (prefix tokens + text) or, with chat, a one-message chat; messages -> chat."""
        if isinstance(prompt, str):
            if chat:
                return chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
            return raw_prompt(self.tokenizer, prompt)
        if _is_messages(prompt):
            return chat_prompt(self.tokenizer, prompt)
        return [int(i) for i in prompt]

    def sampling(self, prompt_len: int, **sampling) -> SamplingConfig:
        """Sampling settings with the family's stop ids; max_new_tokens is cut to what the context has left."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise GlmcError(f"unknown sampling option '{unknown[0]}' (known: {', '.join(SAMPLING_KEYS)})")
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
        return self.generate(list(messages), chat=True, **sampling)

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


def load(path: str | Path | None = None, family: str | None = None, dtype: str | None = None, device: str = "cpu",
         max_length: int | None = None, backend: str = "auto", target: str | None = None,
         max_batch: int | None = None, threads: int = 0, tensor_parallel: int | None = None, **options) -> Model:
    """The one place that turns a path into a runnable model: a build directory (manifest.json), one lowered ONNX
    model (`.../onnx/<target>/model.onnx` or its folder: that graph, or a refusal), or a checkpoint directory
    (default: the shipped model). `backend`: auto | torch | onnxruntime | tensorrt | cuda (glmc.runtime.loader.pick);
    `dtype` (torch backend): the checkpoint's own by default for builds on CUDA, else float32. `tensor_parallel` N > 1
    (default: the build's parallel.tensor) runs the torch backend split over N processes (glmc.parallel)."""
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
