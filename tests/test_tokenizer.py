"""Tokenizers on tiny tokenizer files built here: special ids, encode/decode round trips, batching, streaming."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tiktoken._educational import bpe_train

from glmc.errors import GlmcError
from glmc.modeling_patches.tokenizer import (
    GLM4_PATTERN,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    write_tiktoken_ranks,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small tokenizer test with some words repeated: hello hello world.",
    "def main():\n    return 42  # a comment\n",
    "你好，世界！这是一个测试。我们喜欢分词。",
    "Numbers 12345 and 678, symbols #$% and emoji 😀.",
    "  leading spaces, double  spaces and trailing  ",
]


# ------------------------------------------------------------------------------ builders (other tests import these)

def build_sentencepiece(d: Path, vocab_size: int = 400, family: str = "chatglm3") -> Path:
    """A tiny ChatGLM-style SentencePiece model (BPE, byte fallback, no normalisation) in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    name = {"chatglm2": "THUDM/chatglm2-6b", "chatglm3": "THUDM/chatglm3-6b"}[family]
    (d / "tokenizer_config.json").write_text(json.dumps({"name_or_path": name, "tokenizer_class": "ChatGLMTokenizer",
                                                         "padding_side": "left"}))
    return d


def build_tiktoken(d: Path, vocab_size: int = 320) -> Path:
    """A tiny GLM-4-style tokenizer.model: byte-level BPE ranks trained here, as base64 + rank lines."""
    d.mkdir(parents=True, exist_ok=True)
    ranks = bpe_train("\n".join(CORPUS * 5), vocab_size, GLM4_PATTERN, visualise=None)
    write_tiktoken_ranks(ranks, d / "tokenizer.model")
    return d


def pad_sentencepiece(src: Path, d: Path, size: int = 64789) -> Path:
    """The SentencePiece model of `src` with never-used pieces appended up to ChatGLM's 64789, written to `d`."""
    # protobuf creates the generated module's classes at import time: mypy cannot see them
    model_proto = sp_pb2.ModelProto  # type: ignore[attr-defined]
    proto = model_proto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    while len(proto.pieces) < size:
        proto.pieces.add(piece=f"▁pad{len(proto.pieces)}", score=-1e4, type=model_proto.SentencePiece.NORMAL)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    return d


def build_glm4_size_tiktoken(d: Path) -> Path:
    """A tiktoken-style file with GLM-4's 151329 ranks (all bytes + filler tokens), for the real special ids."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({f"t{i}".encode(): i for i in range(256, 151329)})
    d.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks(ranks, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    return build_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def tk_dir(tmp_path_factory) -> Path:
    return build_tiktoken(tmp_path_factory.mktemp("tk"))


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken"])
def tok(request, sp_dir, tk_dir):
    return load_tokenizer(sp_dir if request.param == "sentencepiece" else tk_dir)


# ------------------------------------------------------------------------------ special tokens

def test_sentencepiece_special_ids_follow_the_vocabulary(sp_dir):
    t = load_tokenizer(sp_dir)
    assert isinstance(t, SentencePieceTokenizer)
    n = t.sp.vocab_size()
    assert t.family == "chatglm3"
    assert [t.special(s) for s in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                                   "<|assistant|>", "<|observation|>")] == list(range(n, n + 9))
    assert (t.eos_id, t.pad_id, t.vocab_size) == (2, 0, n + 9)
    t2 = load_tokenizer(sp_dir, family="chatglm2")
    assert t2.vocab_size == n + 5 and t2.special("eop") == n + 4
    with pytest.raises(GlmcError, match="no special token '<\\|user\\|>'"):
        t2.special("<|user|>")


def test_sentencepiece_real_size_gives_chatglm_ids(sp_dir, tmp_path):
    """Pad the tiny model's vocabulary to ChatGLM's 64789 pieces: the special ids become the real 64789..64797."""
    t = load_tokenizer(pad_sentencepiece(sp_dir, tmp_path), family="chatglm3")
    assert t.special_ids == {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
                             "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}
    assert t.decode(t.encode("hello world")) == "hello world"


def test_tiktoken_special_ids_follow_the_ranks(tk_dir, tmp_path):
    t = load_tokenizer(tk_dir)
    assert isinstance(t, TiktokenTokenizer) and t.family == "glm4" and t.base_size == 320
    assert t.special("<|endoftext|>") == 320 == t.eos_id == t.pad_id
    assert [t.special(s) for s in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>")] == \
           [322, 324, 327, 328, 329]
    # With GLM-4's 151329 ranks the ids are the real ones (DESIGN.md).
    big = load_tokenizer(build_glm4_size_tiktoken(tmp_path))
    assert [big.special(s) for s in ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == \
           list(range(151329, 151339))


def test_special_token_text_is_not_a_special_token(tok):
    ids = tok.encode("<|user|>[gMASK]")
    assert all(i < tok.base_size for i in ids) and tok.decode(ids) == "<|user|>[gMASK]"
    user = tok.special("<|user|>" if tok.family != "chatglm2" else "sop")
    assert tok.decode([user] + tok.encode("hi"), skip_special=False) == tok.decode([user], skip_special=False) + "hi"
    assert tok.decode([user] + tok.encode("hi")) == "hi"


# ------------------------------------------------------------------------------ loading errors

def test_loading_errors_name_the_file(tmp_path, sp_dir, tk_dir):
    with pytest.raises(GlmcError, match=str(tmp_path / "tokenizer.model")):
        load_tokenizer(tmp_path)
    with pytest.raises(GlmcError, match="family 'glm4'"):
        load_tokenizer(sp_dir, family="glm4")
    with pytest.raises(GlmcError, match="family 'chatglm3'"):
        load_tokenizer(tk_dir, family="chatglm3")
    (tmp_path / "tokenizer.model").write_text("aGVsbG8= 0\naGVsbG8= 1\n")
    with pytest.raises(GlmcError, match=r"tokenizer\.model:2: token b'hello' appears twice"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05junk")
    with pytest.raises(GlmcError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path)


def test_family_comes_from_config_or_tokenizer_config(sp_dir, tmp_path):
    d = build_sentencepiece(tmp_path / "c2", family="chatglm2")
    assert load_tokenizer(d).family == "chatglm2"
    (d / "config.json").write_text(json.dumps({"model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b"}))
    assert load_tokenizer(d).family == "chatglm3"


# ------------------------------------------------------------------------------ round trips (property-based)

# U+2581 is SentencePiece's own space marker: decode turns it into a space in every SentencePiece model.
TEXT = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_unicode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.base_size for i in ids)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_streaming_decode_equals_full_decode_of_text(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # no half-decoded characters on the way


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streaming_decode_equals_full_decode_of_any_ids(tok, data):
    """Arbitrary id sequences too: stray UTF-8 bytes, specials, ids past the vocabulary (model padding rows)."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 3), max_size=30))
    skip = data.draw(st.booleans())
    dec = tok.stream_decoder(skip_special=skip)
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == tok.decode(ids, skip_special=skip)


def test_streaming_keeps_sentencepiece_spaces_and_waits_for_whole_characters(sp_dir):
    t = load_tokenizer(sp_dir)
    assert isinstance(t, SentencePieceTokenizer)
    ids = t.encode("hello world 你好 🎉!")  # 🎉 is not in the corpus: byte fallback
    dec = t.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == "hello world 你好 🎉!"
    assert " world" in pieces  # the word-initial space is part of the word's piece
    emoji = [t.sp.id_to_piece(i) for i in ids].index("<0xF0>")  # 4 byte-fallback pieces
    assert pieces[emoji:emoji + 4] == ["", "", "", "🎉"]


# ------------------------------------------------------------------------------ batching

def test_batch_encode_pads_left_with_positions_from_zero(tok):
    texts = ["hello world, this is longer", "hi"]
    b = tok.batch_encode(texts)
    long, short = tok.encode(texts[0]), tok.encode(texts[1])
    width = len(long)
    assert b.input_ids.shape == (2, width)
    assert b.input_ids[0].tolist() == long
    pad = width - len(short)
    assert b.input_ids[1].tolist() == [tok.pad_id] * pad + short
    assert b.attention_mask[1].tolist() == [0] * pad + [1] * len(short)
    assert b.position_ids[1].tolist() == [0] * pad + list(range(len(short)))
    assert b.position_ids[0].tolist() == list(range(width))
    ids_batch = tok.batch_encode([[5, 6, 7], [9]])
    assert ids_batch.input_ids.tolist() == [[5, 6, 7], [tok.pad_id, tok.pad_id, 9]]
