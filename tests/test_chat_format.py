"""Chat formats: the exact token layout of ChatGLM2 rounds, ChatGLM3 and GLM-4 roles, stop ids, reply parsing."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import build_glm4_size_tiktoken, build_sentencepiece, build_tiktoken, pad_sentencepiece

from glmc.errors import GlmcError
from glmc.modeling_patches.tokenizer import SentencePieceTokenizer, load_tokenizer
from glmc.runtime.chat_format import ReplyParser, chat_prompt, raw_prompt, stop_ids

TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"city": {"type": "string"}}}]
MESSAGES: list[dict[str, object]] = [
    {"role": "system", "content": "You are helpful.", "tools": TOOLS},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='Paris')"},
    {"role": "observation", "content": "{\"sun\": true}"},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    sp = build_sentencepiece(root / "sp")
    return {"sp": sp, "chatglm2": build_sentencepiece(root / "sp2", family="chatglm2"),
            "real_sp": pad_sentencepiece(sp, root / "real_sp"), "tk": build_tiktoken(root / "tk"),
            "real_tk": build_glm4_size_tiktoken(root / "real_tk")}


def test_chatglm3_layout(dirs):
    t = load_tokenizer(dirs["real_sp"], family="chatglm3")
    assert isinstance(t, SentencePieceTokenizer)
    ids = chat_prompt(t, MESSAGES)
    enc = t.encode
    system = "You are helpful.\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    assert ids == ([64790, 64792] + [64794] + enc("\n") + enc(system) + [64795] + enc("\n") + enc("hi")
                   + [64796] + enc("get_weather\n") + enc("tool_call(city='Paris')")
                   + [64797] + enc("\n") + enc("{\"sun\": true}") + [64796])
    assert t.sp.id_to_piece(enc("\n")[0]) == "▁" and len(enc("\n")) == 2  # as ChatGLM3's [30910 '▁', 13 '\\n']
    # Read back: SentencePiece puts a space before each message's text, as with the real ChatGLM3.
    short = chat_prompt(t, [{"role": "user", "content": "hi"}])
    assert t.decode(short, skip_special=False) == "[gMASK]sop<|user|>\n hi<|assistant|>"
    assert stop_ids(t) == [2, 64795, 64797]


def test_glm4_layout(dirs):
    t = load_tokenizer(dirs["real_tk"])
    tiny = load_tokenizer(dirs["tk"])
    assert t.decode(chat_prompt(t, [{"role": "user", "content": "hi"}]), skip_special=False) == \
           "[gMASK]<sop><|user|>\nhi<|assistant|>"
    ids = chat_prompt(tiny, MESSAGES)
    s = tiny.special
    system = "You are helpful." + f"\n\n## get_weather\n\n{json.dumps(TOOLS[0], ensure_ascii=False, indent=4)}" \
             + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    enc = tiny.encode
    assert ids == ([s("[gMASK]"), s("<sop>"), s("<|system|>")] + enc("\n") + enc(system)
                   + [s("<|user|>")] + enc("\n") + enc("hi")
                   + [s("<|assistant|>")] + enc("get_weather\n") + enc("tool_call(city='Paris')")
                   + [s("<|observation|>")] + enc("\n") + enc("{\"sun\": true}") + [s("<|assistant|>")])
    assert stop_ids(t) == [151329, 151336, 151338]


def test_chatglm2_rounds(dirs):
    t = load_tokenizer(dirs["chatglm2"])
    assert t.family == "chatglm2"
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "what is 2+2?"}]
    ids = chat_prompt(t, msgs)
    n = t.base_size
    assert ids[:2] == [n + 1, n + 3]  # [gMASK] sop
    assert ids[2:] == t.encode("[Round 1]\n\n问：你好\n\n答：Hello!\n\n[Round 2]\n\n问：what is 2+2?\n\n答：")
    assert t.decode(ids, skip_special=False) == \
           "[gMASK]sop[Round 1]\n\n问：你好\n\n答：Hello!\n\n[Round 2]\n\n问：what is 2+2?\n\n答："
    assert stop_ids(t) == [2]
    with pytest.raises(GlmcError, match="knows user, assistant"):
        chat_prompt(t, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(GlmcError, match="alternating"):
        chat_prompt(t, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_raw_prompt_and_message_errors(dirs):
    t = load_tokenizer(dirs["sp"])
    assert raw_prompt(t, "def f") == [t.special("[gMASK]"), t.special("sop")] + t.encode("def f")
    with pytest.raises(GlmcError, match="no messages"):
        chat_prompt(t, [])
    with pytest.raises(GlmcError, match="message 2 has role 'bot'"):
        chat_prompt(t, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(GlmcError, match="message 1 needs a string 'content'"):
        chat_prompt(t, [{"role": "user"}])


# ------------------------------------------------------------------------------ replies

def _parse_whole(family_has_metadata: bool, text: str) -> tuple[str, str]:
    """The original process_response: split off the metadata line if there is a newline, strip the content."""
    if family_has_metadata and "\n" in text:
        metadata, content = text.split("\n", 1)
    else:
        metadata, content = "", text
    return metadata, content.strip()


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("ab \n\t"), max_size=20), cuts=st.lists(st.integers(0, 20), max_size=6),
       family=st.sampled_from(["sp", "chatglm2"]))
def test_streamed_reply_equals_whole_reply(dirs, text, cuts, family):
    t = load_tokenizer(dirs[family])
    parser = ReplyParser(t)
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    shown = "".join(parser.feed(text[a:b]) for a, b in itertools.pairwise(bounds)) + parser.finish()
    metadata, content = _parse_whole(t.family != "chatglm2", text)
    assert (parser.metadata, parser.content, shown) == (metadata, content, content)
    assert parser.message == {"role": "assistant", "metadata": metadata, "content": content}


def test_reply_metadata_line_is_held_back(dirs):
    parser = ReplyParser(load_tokenizer(dirs["sp"]))
    assert [parser.feed(p) for p in ["get_", "weather\n", "tool_call()", "  \n", "x"]] == \
           ["", "", "tool_call()", "", "  \nx"]
    assert parser.metadata == "get_weather"
