"""Accuracy of precision combinations against the float32 model: perplexity, logits relative error, top-1 agreement.

Every precision is made from the same float32 model (apply_scheme: KV scales calibrated on the float model,
cast, weight quantization) and run on the same held-out windows of `max_length` tokens. Precisions with an int8
KV cache are fed `chunk` tokens per forward with the cache carried between forwards, so with chunk=1 (the
default) every prediction attends to a cache that went through the int8 round trip exactly as in generation;
with a larger chunk, the tokens inside one chunk attend to each other in float and kv8 looks better than it is.
Precisions with a float cache give the same logits either way, so they (and the fp32 reference) take each window
in one forward.

Metrics, over all predicted positions of all windows:
  perplexity   exp(mean negative log-likelihood of the next token), log-softmax in float32
  rel. error   ||logits - logits_fp32||_2 / ||logits_fp32||_2 (Frobenius over positions x vocabulary)
  top-1        fraction of positions whose argmax equals the float32 model's argmax
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import Fp8Linear, GLMForCausalLM, QuantLinear, W8A8Linear
from glmc.quantization.scheme import Scheme, apply_scheme, parse_precision

DEFAULT_HELDOUT = Path(__file__).with_name("heldout.txt")


@dataclasses.dataclass
class Result:
    """Accumulated metrics of one precision."""

    name: str
    nll: float = 0.0
    tokens: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    top1: int = 0
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll / max(self.tokens, 1)).exp())

    @property
    def rel_error(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0

    @property
    def top1_agreement(self) -> float:
        return self.top1 / max(self.tokens, 1)


def heldout_windows(encode: Callable[[str], Sequence[int]], path: str | Path | None = None, max_length: int = 256,
                    max_tokens: int | None = None) -> list[torch.Tensor]:
    """The held-out text (default: heldout.txt next to this module) as token windows [1, <= max_length]."""
    p = Path(path) if path else DEFAULT_HELDOUT
    if not p.is_file():
        raise GlmcError(f"{p}: evaluation text file does not exist")
    ids = list(encode(p.read_text(encoding="utf-8")))
    if max_tokens:
        ids = ids[:max_tokens]
    windows = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise GlmcError(f"{p}: fewer than 2 tokens of text to evaluate on")
    return [torch.tensor([w], dtype=torch.int64) for w in windows]


@torch.no_grad()
def window_logits(model: GLMForCausalLM, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """float32 logits [S, V] of one window [1, S], fed `chunk` tokens per forward with the cache carried."""
    device = model.cos_cache.device
    ids = ids.to(device)
    s = ids.shape[1]
    cache = model.empty_cache(1, device)
    out = []
    for start in range(0, s, chunk):
        piece = ids[:, start:start + chunk]
        positions = torch.arange(start, start + piece.shape[1], device=device).unsqueeze(0)
        mask = torch.ones(1, start + piece.shape[1], dtype=torch.int64, device=device)
        logits, cache = model(piece, positions, mask, cache)
        out.append(logits[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate(base: GLMForCausalLM, precisions: Sequence[str], windows: Sequence[torch.Tensor],
             calibration: list[torch.Tensor] | None = None, chunk: int = 1,
             progress: Callable[[str, int, int], None] | None = None,
             make: Callable[[Scheme], GLMForCausalLM] | None = None) -> list[Result]:
    """Metrics of each precision (names as in scheme.parse_precision) against `base` (a float32 model).

    Each precision's model comes from `make(scheme)` (`glmc eval` passes the compile pipeline's quantize stage),
    else from apply_scheme on a copy of `base` with `calibration`. One precision at a time: the float32 reference
    logits are kept, each converted model is freed after its run, so memory is the float model, one converted copy
    and the reference logits (tokens x vocabulary floats).
    """
    if chunk < 1:
        raise GlmcError(f"eval: chunk {chunk} must be >= 1")
    if any(isinstance(m, (QuantLinear, Fp8Linear, W8A8Linear)) for m in base.modules()) \
            or not base.kv_dtype.is_floating_point or base.kv_dtype.itemsize == 1:  # int8 / e4m3 caches
        raise GlmcError("eval: the model directory holds a quantized checkpoint; evaluate its float original")
    schemes = [parse_precision(name) for name in precisions]
    base = base.float().eval()
    refs = [window_logits(base, ids, ids.shape[1])[:-1] for ids in windows]  # position t predicts token t + 1
    results = []
    for name, scheme in zip(precisions, schemes, strict=False):
        model = (make(scheme) if make else apply_scheme(copy.deepcopy(base), scheme, calibration)).eval()
        res = Result(name)
        for i, (ids, ref) in enumerate(zip(windows, refs, strict=False)):
            target = ids[0, 1:]
            t = time.perf_counter()
            logits = window_logits(model, ids, chunk if scheme.kv_granularity else ids.shape[1])[:-1]
            res.seconds += time.perf_counter() - t
            res.nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            res.tokens += len(target)
            res.err_sq += float((logits.double() - ref.double()).pow(2).sum())
            res.ref_sq += float(ref.double().pow(2).sum())
            res.top1 += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            if progress:
                progress(name, i + 1, len(windows))
        results.append(res)
        del model
    return results


def baseline_index(results: Sequence[Result]) -> int | None:
    """The row quantized rows are compared with: fp16 if present, else the first unquantized row."""
    schemes = [parse_precision(r.name) for r in results]
    for want in ("fp16", None):
        for i, s in enumerate(schemes):
            if not s.weight_bits and not s.kv_granularity and (want is None or s.dtype == want):
                return i
    return None


def table_rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (shared by the rich table and the markdown output)."""
    b = baseline_index(results)
    base_name = results[b].name if b is not None else None
    header = ["precision", "scheme", "perplexity", f"Δ ppl vs {base_name}" if base_name else "Δ ppl",
              "logits rel. error", "top-1 agreement", "tokens", "seconds"]
    rows = []
    for r in results:
        delta = "" if b is None else f"{100 * (r.perplexity / results[b].perplexity - 1):+.2f}%"
        rows.append([r.name, parse_precision(r.name).name, f"{r.perplexity:.4f}", delta, f"{r.rel_error:.2e}",
                     f"{100 * r.top1_agreement:.2f}%", str(r.tokens), f"{r.seconds:.1f}"])
    return header, rows


def print_table(results: Sequence[Result], title: str = "", markdown: bool = False) -> None:
    header, rows = table_rows(results)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title or None, caption="logits error and top-1 agreement against fp32")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped: rich would assume 80 columns and squeeze the table
        console = Console(width=140)
    console.print(table)
