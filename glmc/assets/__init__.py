"""Where the model shipped inside the package lives: the default model of every command."""

from __future__ import annotations

from pathlib import Path

from glmc.errors import GlmcError

SHIPPED_MODEL = Path(__file__).parent / "glmc-tiny"


def model_dir(path: str | Path | None = None) -> Path:
    """The model directory a command should use: `path`, or the shipped model when none is given."""
    d = Path(path) if path is not None else SHIPPED_MODEL
    if d.is_dir():
        return d
    if path is None:
        raise GlmcError(f"the shipped model is missing: {d} does not exist (reinstall glmc, or pass --model DIR)")
    raise GlmcError(f"{d}: model directory does not exist")
