"""Chat prompts as token ids for each family (ChatGLM2 rounds, ChatGLM3 and GLM-4 roles), stop ids, reply parsing.

Messages are dicts like ChatGLM3's history: {"role", "content", optional "metadata", optional "tools"}.
ChatGLM3/GLM-4 lay out each message as `<|role|>` + encode(metadata + "\\n") + encode(content), start the prompt
with their prefix tokens and end it with `<|assistant|>`; the reply's first line is its metadata (a tool name,
usually empty). ChatGLM2 writes "[Round N]\\n\\n问：{q}\\n\\n答：{a}\\n\\n" rounds as plain text after its prefix.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

from glmc.errors import GlmcError
from glmc.modeling_patches.tokenizer import Tokenizer


def _tools_chatglm3(content: str, tools: list) -> str:
    return content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def _tools_glm4(content: str, tools: list) -> str:
    for function in tools:
        content += f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}"
        content += "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    return content


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How one family turns messages into a prompt and when its replies end."""

    prefix: tuple[str, ...]  # special tokens opening every prompt (also raw, untemplated prompts)
    roles: tuple[str, ...]  # roles a message may have
    style: str  # "rounds": ChatGLM2 text rounds; "roles": a role token per message
    stop: tuple[str, ...]  # special tokens that end a reply ("eos" = the tokenizer's end-of-text id)
    tools: Callable[[str, list], str] | None  # appends a system message's tools to its content
    metadata_line: bool  # replies start with a metadata line


_ROLES = ("system", "user", "assistant", "observation")

FORMATS: dict[str, ChatFormat] = {
    "chatglm2": ChatFormat(("[gMASK]", "sop"), ("user", "assistant"), "rounds", ("eos",), None, False),
    "chatglm3": ChatFormat(("[gMASK]", "sop"), _ROLES, "roles", ("eos", "<|user|>", "<|observation|>"),
                           _tools_chatglm3, True),
    "glm4": ChatFormat(("[gMASK]", "<sop>"), _ROLES, "roles", ("eos", "<|user|>", "<|observation|>"),
                       _tools_glm4, True),
}


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    return FORMATS[tokenizer.family]


def prefix_ids(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.special(name) for name in chat_format(tokenizer).prefix]


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.special(name) for name in chat_format(tokenizer).stop]


def raw_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt without the chat template: the family's prefix tokens + the text (as ChatGLM's tokenizer does)."""
    return prefix_ids(tokenizer) + tokenizer.encode(text)


def _check(fmt: ChatFormat, family: str, messages: Sequence[dict]) -> None:
    if not messages:
        raise GlmcError("chat: no messages")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise GlmcError(f"chat: message {n} needs a string 'content' (got {m!r:.80})")
        if m.get("role") not in fmt.roles:
            raise GlmcError(f"chat: message {n} has role {m.get('role')!r}; {family} knows {', '.join(fmt.roles)}")


def _rounds_text(messages: Sequence[dict]) -> str:
    """ChatGLM2: alternating user/assistant messages, ending with a user message, as "[Round N]" text."""
    roles = [m["role"] for m in messages]
    if roles != (["user", "assistant"] * len(roles))[:len(roles)] or len(roles) % 2 == 0:
        raise GlmcError(f"chat: chatglm2 needs alternating user/assistant messages ending with a user message, "
                        f"got {roles}")
    text = ""
    for i in range(0, len(messages) - 1, 2):
        text += f"[Round {i // 2 + 1}]\n\n问：{messages[i]['content']}\n\n答：{messages[i + 1]['content']}\n\n"
    return text + f"[Round {len(messages) // 2 + 1}]\n\n问：{messages[-1]['content']}\n\n答："


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Messages -> the prompt ids that ask the model for the next assistant reply."""
    fmt = chat_format(tokenizer)
    _check(fmt, tokenizer.family, messages)
    ids = prefix_ids(tokenizer)
    if fmt.style == "rounds":
        return ids + tokenizer.encode(_rounds_text(messages))
    for m in messages:
        content = m["content"]
        if m["role"] == "system" and m.get("tools"):
            if fmt.tools is None:
                raise GlmcError(f"chat: {tokenizer.family} has no format for a system message's tools")
            content = fmt.tools(content, m["tools"])
        ids += [tokenizer.special(f"<|{m['role']}|>")] + tokenizer.encode(f"{m.get('metadata', '')}\n")
        ids += tokenizer.encode(content)
    return ids + [tokenizer.special("<|assistant|>")]


class ReplyParser:
    """Splits a streamed reply into its metadata line (ChatGLM3/GLM-4) and its content, stripped like the
    original `process_response`; `feed` returns the content that can be shown now."""

    def __init__(self, tokenizer: Tokenizer):
        self.in_content = not chat_format(tokenizer).metadata_line
        self.head = ""  # text before the metadata line's newline
        self.pending = ""  # content whitespace not shown yet (it may be trailing)
        self.metadata = ""
        self.content = ""

    def feed(self, piece: str) -> str:
        if not self.in_content:
            self.head += piece
            if "\n" not in self.head:
                return ""
            self.metadata, piece = self.head.split("\n", 1)
            self.in_content = True
        text = self.pending + piece
        if not self.content:
            text = text.lstrip()
        keep = len(text.rstrip())
        self.pending = text[keep:]
        self.content += text[:keep]
        return text[:keep]

    def finish(self) -> str:
        """The rest of the content (a reply with no newline at all is all content, no metadata)."""
        if self.in_content:
            return ""
        self.in_content = True
        return self.feed(self.head)

    @property
    def message(self) -> dict:
        """The reply as a history message."""
        return {"role": "assistant", "metadata": self.metadata, "content": self.content}
