"""Tokens -> the text a client is sent: incremental decoding, the chat reply's metadata line held back, stop strings.

`TextOut.push(token)` returns the text that may be shown now; `finish()` the rest. A stop string ends the text
before it, and no prefix of a stop string is sent until the text after it shows that it is not one (so a stream
never leaks a partial stop string). With `chat`, the reply goes through glmc's ReplyParser exactly as
`glmc.load(...).chat(...)` does, so the served text equals the embedded API's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from glmc.runtime.chat_format import ReplyParser


class TextOut:
    def __init__(self, tokenizer: Any, chat: bool, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.parser = ReplyParser(tokenizer) if chat else None
        self.stop = [s for s in stop if s]
        self.held = ""  # text that may be the start of a stop string
        self.stopped = False  # a stop string was found: nothing more is shown
        self.text = ""  # everything shown so far

    def push(self, token: int) -> str:
        piece = self.decoder.push(token)
        if self.parser is not None:
            piece = self.parser.feed(piece) if piece else ""
        return self._emit(piece)

    def finish(self) -> str:
        tail = self.decoder.flush()
        if self.parser is not None:
            tail = (self.parser.feed(tail) if tail else "") + self.parser.finish()
        out = self._emit(tail)
        if not self.stopped:
            out += self.held
            self.text += self.held
        self.held = ""
        return out

    def _emit(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        buf = self.held + piece
        found = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            out = buf[:min(found)]
        else:
            keep = 0  # the longest end of buf that begins some stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(buf)), keep, -1):
                    if buf.endswith(s[:n]):
                        keep = n
                        break
            out, self.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out
