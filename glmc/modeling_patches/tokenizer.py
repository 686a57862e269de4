"""ChatGLM2/3 (SentencePiece) and GLM-4 (tiktoken-style) tokenizers behind one interface, with batching and streaming.

Both keep their special tokens after the base vocabulary, in the order of the original tokenizers
(docs/design.md, "ChatGLM facts"): ids = base vocabulary size + index in SPECIAL_TOKENS[family]. Plain-text
`encode` never turns text such as "<|user|>" into a special token; chat formats insert those by id.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from glmc.errors import ConfigError, GlmcError

_SP_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
               "<|observation|>")
_GLM4_SPECIAL = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")

# family -> special tokens appended after the base vocabulary, in id order
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatglm2": _SP_SPECIAL[:5],  # ChatGLM2 has no role tokens
    "chatglm3": _SP_SPECIAL,
    "glm4": _GLM4_SPECIAL,
}

# GLM-4's pre-tokenizer split (its tokenization_chatglm.py): cl100k-like, numbers in groups of up to 3 digits.
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TOKENIZER_FILE = "tokenizer.model"


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids, attention_mask, position_ids [B, S]: padded on the left, positions from 0 per row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GlmcError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.int64)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@dataclasses.dataclass
class Batch:
    """Left-padded prompts as ChatGLM expects them: positions start at 0 on each row's first real token."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64, 0 on padding
    position_ids: torch.Tensor  # [B, S] int64


class Tokenizer:
    """The family-independent part: special tokens after the base vocabulary, decode, batching, streaming."""

    def __init__(self, family: str, base_size: int, eos_id: int, pad_id: int, path: Path):
        self.family = family
        self.path = path
        self.base_size = base_size
        self.special_ids = {name: base_size + i for i, name in enumerate(SPECIAL_TOKENS[family])}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        self.eos_id = eos_id
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.special_ids)

    def special(self, name: str) -> int:
        """The id of a special token by name ("eos" = the end-of-text id)."""
        if name == "eos":
            return self.eos_id
        if name not in self.special_ids:
            raise GlmcError(f"{self.path}: the {self.family} tokenizer has no special token '{name}' "
                            f"(it has: {', '.join(self.special_ids)})")
        return self.special_ids[name]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no prefix tokens, special-token text stays text)."""
        raise NotImplementedError

    def _decode_base(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text; special tokens are dropped or written by name; ids outside the vocabulary (the
        model's padding rows) decode to nothing."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < self.base_size:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_base(run))
                run = []
            if i in self.special_names and not skip_special:
                parts.append(self.special_names[i])
        if run:
            parts.append(self._decode_base(run))
        return "".join(parts)

    def batch_encode(self, prompts: Sequence[str | Sequence[int]]) -> Batch:
        """Texts (encoded plainly) or id lists -> one left-padded batch."""
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return Batch(*left_pad(ids, self.pad_id))

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


class SentencePieceTokenizer(Tokenizer):
    """ChatGLM2/ChatGLM3: a SentencePiece model (byte fallback) + special tokens after its vocabulary."""

    def __init__(self, path: Path, family: str):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise GlmcError(f"{path}: not a valid SentencePiece model ({e})") from None
        pad = self.sp.unk_id()  # ChatGLM pads with <unk> (id 0)
        super().__init__(family, self.sp.vocab_size(), self.sp.eos_id(), pad, path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_base(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TiktokenTokenizer(Tokenizer):
    """GLM-4: byte-level BPE from a tiktoken-style file (base64 token + rank per line) + special tokens."""

    def __init__(self, path: Path):
        import tiktoken
        ranks = read_tiktoken_ranks(path)
        eos = len(ranks)  # <|endoftext|> is the first special token
        super().__init__("glm4", len(ranks), eos, eos, path)
        self.enc = tiktoken.Encoding(name=f"glmc:{path}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_ids)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_base(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64-token rank` lines; ranks must be 0..n-1 with each of the 256 bytes present."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected 'base64-token rank'")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise GlmcError(f"{path}:{lineno}: not a tiktoken rank line ({e}): {line[:60]!r}") from None
        if token in ranks:
            raise GlmcError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise GlmcError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise GlmcError(f"{path}: single byte 0x{missing[0]:02x} has no rank ({len(missing)} bytes missing); "
                        "byte-level BPE needs all 256")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Write a tiktoken-style tokenizer.model (the inverse of read_tiktoken_ranks)."""
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]*={0,2} \d+")


def _is_tiktoken_file(path: Path) -> bool:
    with path.open("rb") as f:
        first = f.readline(4096).rstrip(b"\r\n")
    return bool(_TIKTOKEN_LINE.fullmatch(first))


def _sentencepiece_family(d: Path) -> str:
    """chatglm2 or chatglm3 for a SentencePiece checkpoint: config.json first, then tokenizer_config.json."""
    from glmc.modeling_patches.config import detect_family
    config = d / "config.json"
    if config.is_file():
        try:
            family = detect_family(json.loads(config.read_text()), d)
            if family in ("chatglm2", "chatglm3"):
                return family
        except (json.JSONDecodeError, ConfigError):
            pass
    tok_config = d / "tokenizer_config.json"
    if tok_config.is_file() and re.search(r"chatglm-?2", tok_config.read_text(errors="replace").lower()):
        return "chatglm2"
    return "chatglm3"


def load_tokenizer(model_dir: str | Path, family: str | None = None) -> Tokenizer:
    """The tokenizer of a ChatGLM2/ChatGLM3/GLM-4 checkpoint directory (its `tokenizer.model`).

    The file's format decides SentencePiece vs tiktoken; `family` (or config.json / tokenizer_config.json)
    tells ChatGLM2 from ChatGLM3.
    """
    d = Path(model_dir)
    path = d / TOKENIZER_FILE
    if not path.is_file():
        hint = " (this directory has only tokenizer.json, the transformers-native '-hf' layout)" \
            if (d / "tokenizer.json").is_file() else ""
        raise GlmcError(f"{path}: no tokenizer file; ChatGLM2/3 and GLM-4 checkpoints carry their tokenizer as "
                        f"{TOKENIZER_FILE}{hint}")
    if family is not None and family not in SPECIAL_TOKENS:
        raise GlmcError(f"family '{family}' is not one of {', '.join(SPECIAL_TOKENS)}")
    if _is_tiktoken_file(path):
        if family not in (None, "glm4"):
            raise GlmcError(f"{path}: a tiktoken-style (GLM-4) tokenizer, but family '{family}' was asked for")
        return TiktokenTokenizer(path)
    if family == "glm4":
        raise GlmcError(f"{path}: a SentencePiece (ChatGLM2/3) tokenizer, but family 'glm4' was asked for")
    return SentencePieceTokenizer(path, family or _sentencepiece_family(d))


class StreamDecoder:
    """Ids, one at a time -> text pieces whose concatenation equals `tokenizer.decode(all ids)`.

    A piece is released only when it does not end in U+FFFD (an unfinished UTF-8 byte sequence from byte
    fallback / byte-level BPE); `flush` releases the rest. Each step decodes a short window that starts one
    released piece back, so SentencePiece's word-initial spaces are kept and the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been released

    def _window(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        return (dec(self.ids[self.prefix:self.read], self.skip_special),
                dec(self.ids[self.prefix:], self.skip_special))

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done, text = self._window()
        if len(text) > len(done) and not text.endswith("\ufffd") and text.startswith(done):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done, text = self._window()
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
