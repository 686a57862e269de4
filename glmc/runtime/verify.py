"""Check lowered ONNX graphs (and other engines) against the torch model, through the backends users run.

`verify(model, {target: onnx_path}, prompts, steps, backends={name: make})` is the library entry point (the
compile pipeline's verify stage calls it; `glmc verify` runs that pipeline). Every lowering runs in
`OnnxRuntimeBackend`, the class `glmc run` and `glmc.load` use, so the session (its options from the runtime config
beside the model), the device-resident cache and the graph form (padded, or unpadded rows run one at a time, as a
user must) are the ones that ship; the torch model runs in `TorchBackend`; `backends` adds engines that are not
ONNX graphs (the cuda engine, as `load_cuda_build` makes it). All return each step's last-position logits. Decode
logits are compared teacher-forced (every backend is fed the torch model's greedy tokens, so errors do not compound
through different histories); greedy agreement is measured free-running (each backend feeds itself).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from glmc.modeling_patches.modeling_chatglm import Fp8Linear, W8A8Linear
from glmc.modeling_patches.tokenizer import left_pad
from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import Backend


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass criteria: logits error relative to max |torch logits|, top-1 agreement, greedy tokens agreeing. A
    half-precision disagreement where torch's top two logits are within two units of the dtype's resolution
    (2 eps x max |logits|: a near tie, either token is right) counts as agreement, and greedy decoding that first
    diverges at such a tie passes (measured: the shipped fp16+int8+kv8 model's onnxruntime lowering, with the
    residual Add fused into its norm, flipped one such tie against torch fp16 at step 5 of 16)."""

    rel: float
    top1: float = 1.0  # fraction of compared positions whose argmax agrees (or is a near tie)
    greedy_fraction: float = 1.0  # fraction of the N greedy steps that must agree in every row (or: up to a tie)
    # Options that perturb the logits on purpose (int8 activations): a disagreement also counts as a tie where
    # torch's top two logits are within twice the target's own measured max |logits error| (which `rel` caps).
    # Two logit vectors within e of each other can only disagree there, so it excuses exactly the flips that the
    # bounded error explains, and none that it does not.
    ties_within_error: bool = False


def tolerance_for(dtype: torch.dtype, weight_bits: int, kv8: bool, fp8: bool = False, w8a8: bool = False
                  ) -> Tolerance:
    """Bounds per precision, measured on the tiny test models and justified in docs/onnx.md:
    fp32 - same math, different summation order: 1e-4 relative; an int8 cache can flip a code at a rounding
    boundary (one quantization step, absmax/127, in one element): 1e-3. fp16/bf16 - unit roundoff 2^-11 / 2^-8,
    two engines accumulate GEMMs differently: 1e-2 / 4e-2; fp16 + int8 cache: code flips are then common, 2e-2.
    Quantized weights add no error of their own (both sides use the same integer codes and scales).
    `fp8`: activations (or the cache) re-quantized to e4m3 at run time. A flip there moves one element by one e4m3
    step, up to 2^-3 of its own magnitude, and the next layers' inputs by ~1e-4, which flips further codes: two
    correct FP8 executions differ by a cascade (glmc-tiny v2, fp32, ORT vs torch on one 8-token prompt: 1 code of
    4096 flipped in the 2nd linear, 700 of 6144 in the 12th; logits 0.8% apart, 2.0% over the verify prompts),
    i.e. by FP8's own rounding noise. So the bound is that noise, 5e-2 (8e-2 bf16), with top-1 and greedy
    disagreements excused only where the measured error explains them (ties_within_error); a lowering bug (a
    scale missed or applied twice, the weight transposed, no saturation) is off by O(1) or NaN.
    `w8a8` (sq8): every linear's input quantized to int8 per token at run time. A flip moves one element by one
    step of its token, max|row| / 127, which an outlier channel makes large for every other element of the row,
    and a flip in a decode step stays in the KV cache for the steps after it: measured on glmc-tiny v2 sq8, fp32
    7.4e-3 (reference lowering: one flip at decode step 1, 4e-7 before it; ORT's lowering happened to round like
    torch), fp16 1.5e-2. So fp32 2e-2, fp16/bf16 3x their base, disagreements excused only where the measured
    error explains them. A lowering bug touches every token, prefill included (a missed or doubled scale, a
    transposed weight: O(1); ORT's bias fusion, docs/ops.md: 3e-2 at every position of glmc-tiny v1 fp32)."""
    if w8a8 and not fp8:
        rel = 2e-2 if dtype == torch.float32 else {torch.float16: 3e-2, torch.bfloat16: 1.2e-1}[dtype]
        half = dtype != torch.float32
        return Tolerance(rel, top1=0.95 if half else 1.0, greedy_fraction=0.5 if half else 1.0,
                         ties_within_error=True)
    if fp8:
        return Tolerance(8e-2 if dtype == torch.bfloat16 else 5e-2, top1=0.95, greedy_fraction=0.5,
                         ties_within_error=True)
    if dtype == torch.float32:
        return Tolerance(1e-3 if kv8 else 1e-4)
    rel = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype] * (2 if kv8 else 1)
    return Tolerance(rel, top1=0.95, greedy_fraction=0.5)


# ---------------------------------------------------------------------------------------------- comparison

@dataclasses.dataclass
class Trace:
    prefill: torch.Tensor  # [B, S, V] logits (S = 1 from a backend: the prompt's last position)
    mask: torch.Tensor  # [B, S] which prefill positions are real
    decode: list[torch.Tensor]  # per step [B, V] logits of the next token
    tokens: torch.Tensor  # [B, steps] tokens fed / chosen


def greedy_trace(backend: Backend, prompts: Sequence[Sequence[int]], steps: int,
                 forced: torch.Tensor | None = None) -> Trace:
    """Prefill the left-padded prompts, then `steps` greedy tokens (or the `forced` ones). Batches stay within the
    backend's max_batch, and a backend that takes no padded batches (an unpadded lowering: `padded` False) runs
    each prompt on its own, as a user has to."""
    size = 1 if not getattr(backend, "padded", True) else getattr(backend, "max_batch", len(prompts))
    if len(prompts) > size:
        rows = [greedy_trace(backend, prompts[i:i + size], steps, None if forced is None else forced[i:i + size])
                for i in range(0, len(prompts), size)]
        return Trace(torch.cat([r.prefill for r in rows]), torch.cat([r.mask for r in rows]),
                     [torch.cat(step) for step in zip(*(r.decode for r in rows), strict=True)],
                     torch.cat([r.tokens for r in rows]))
    ids, mask, positions = left_pad(prompts)
    last, cache = backend.forward(ids, positions, mask, backend.new_cache(len(prompts)))
    prefill = last[:, None]
    decode, tokens = [], []
    positions = positions[:, -1:]
    for i in range(steps):
        token = forced[:, i] if forced is not None else last.argmax(-1)
        tokens.append(token)
        if i == steps - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.int64)], dim=1)
        positions = positions + 1
        last, cache = backend.forward(token[:, None], positions, mask, cache)
        decode.append(last)
    return Trace(prefill, torch.ones(len(prompts), 1, dtype=torch.int64), decode, torch.stack(tokens, dim=1))


def _errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if a.numel() == 0:
        return 0.0, 0.0
    err = float((a - ref).abs().max())
    return err, err / max(float(ref.abs().max()), 1e-30)


def compare(ref: Trace, forced: Trace, free: Trace, tie_rel: float = 0.0, tie_abs: float = 0.0) -> dict:
    """Metrics of one backend against the torch traces (forced: fed torch's tokens; free: its own greedy). A
    near tie is a position where torch's top two logits differ by at most max(tie_rel * max |torch logits|,
    tie_abs)."""
    real = ref.mask.bool()
    pre_abs, pre_rel = _errors(forced.prefill[real], ref.prefill[real])
    dec_ref = torch.stack(ref.decode) if ref.decode else torch.zeros(0)
    dec = torch.stack(forced.decode) if forced.decode else torch.zeros(0)
    dec_abs, dec_rel = _errors(dec, dec_ref)
    agree = [(forced.prefill[real].argmax(-1) == ref.prefill[real].argmax(-1)).flatten()]
    if ref.decode:
        agree.append((dec.argmax(-1) == dec_ref.argmax(-1)).flatten())
    same = (free.tokens == ref.tokens).int()
    agreeing = same.cumprod(dim=1).sum(dim=1)  # per row: greedy tokens agreeing from the start
    leading = int(agreeing.min())
    # Near ties: torch's top two logits closer than the model dtype's resolution (tie_rel), where two correct
    # implementations may pick either.
    scores = torch.cat([ref.prefill[real]] + ([dec_ref.flatten(0, 1)] if ref.decode else []))  # as `agree`
    tie_gap = max(tie_rel * float(scores.abs().max()), tie_abs)
    top2 = scores.topk(2, dim=-1).values
    tie = (top2[:, 0] - top2[:, 1]) <= tie_gap
    decisions = [ref.prefill[:, -1]] + ref.decode  # the logits behind each greedy token, [B, V] per step
    first = [(r, int(n)) for r, n in enumerate(agreeing) if n < ref.tokens.shape[1]]
    greedy_tie = bool(first) and all(float(decisions[n][r].topk(2).values.diff().abs()) <= tie_gap for r, n in first)
    agreed = torch.cat(agree)
    return {"prefill_max_abs": pre_abs, "prefill_rel": pre_rel, "decode_max_abs": dec_abs, "decode_rel": dec_rel,
            "top1": float(agreed.float().mean()),
            "top1_or_tie": float((agreed | tie).float().mean()), "greedy_agree": leading,
            "greedy_diverged_at_tie": greedy_tie, "steps": ref.tokens.shape[1]}


def _max_rel(trace: Trace, ref: Trace) -> float:
    """Largest relative logits error of `trace` against `ref` over real prompt positions and decode steps."""
    real = ref.mask.bool()
    rel = [_errors(trace.prefill[real], ref.prefill[real])[1]]
    if ref.decode:
        rel.append(_errors(torch.stack(trace.decode), torch.stack(ref.decode))[1])
    return max(rel)


def fp32_oracle(model):
    """The same model (same integer codes and scales) in float32: what half-precision results are judged by."""
    oracle = copy.deepcopy(model).float()
    oracle.init_rotary()  # rebuild the rotary tables in float32 instead of upcasting the rounded ones
    return oracle


def verify(model, onnx_paths: Mapping[str, str | Path], prompts: Sequence[Sequence[int]], steps: int = 16,
           tolerance: Tolerance | None = None, threads: int = 0, oracle: bool = True,
           max_batch: int | None = None, backends: Mapping[str, Callable[[int], Backend]] | None = None,
           tolerances: Mapping[str, Tolerance] | None = None) -> dict:
    """Run the torch model and each lowered graph on `prompts`; return {"tolerance": ..., "targets": {target:
    metrics + "passed"}, "passed": all passed}.

    Half precision: two correct implementations round differently, so the torch model is not the truth either.
    With `oracle` (default), a float32 copy of the model (same codes and scales; twice the memory of a half model)
    also runs, and a target whose logits error against it is at most 1.5x the torch model's own passes the
    logits criterion even past `tolerance.rel` (measured: a 4-layer 1024-wide random fp16 model's ORT logits were
    2.2% off torch fp16, yet 1.5% off fp32 where torch fp16 was 2.1% off).

    `backends`: more engines to check, each made by a function of the longest sequence it must hold; `tolerances`:
    a target's own bounds (recorded in its row) instead of `tolerance`."""
    if tolerance is None:
        kv8 = model.kv_dtype == torch.int8
        layers = model.transformer.encoder.layers
        bits = getattr(layers[0].self_attention.query_key_value, "bits", 0)
        fp8 = model.kv_dtype == torch.float8_e4m3fn or any(isinstance(m, Fp8Linear) for m in model.modules())
        w8a8 = any(isinstance(m, W8A8Linear) for m in model.modules())
        tolerance = tolerance_for(model.dtype, bits, kv8, fp8, w8a8)
    longest = max(len(p) for p in prompts) + steps
    ref = greedy_trace(TorchBackend(model), prompts, steps)
    exact = None
    if oracle and model.dtype != torch.float32:
        exact = greedy_trace(TorchBackend(fp32_oracle(model)), prompts, steps, forced=ref.tokens)
    results = {}
    def ort(path: str | Path) -> Callable[[int], Backend]:
        return lambda length: OnnxRuntimeBackend(path, max_length=length, max_batch=max_batch or len(prompts),
                                                 threads=threads)
    makers = {t: ort(path) for t, path in onnx_paths.items()} | dict(backends or {})
    for target, make in makers.items():
        tol = (tolerances or {}).get(target, tolerance)
        backend = make(longest)
        forced = greedy_trace(backend, prompts, steps, forced=ref.tokens)
        free = greedy_trace(backend, prompts, steps)
        del backend  # one session alive at a time: a large model's session holds its weights
        tie_rel = 0.0 if model.dtype == torch.float32 else 2 * torch.finfo(model.dtype).eps
        m = compare(ref, forced, free, tie_rel=tie_rel)
        if tol.ties_within_error and max(m["prefill_rel"], m["decode_rel"]) <= tol.rel:
            m = compare(ref, forced, free, tie_rel=tie_rel, tie_abs=2 * max(m["prefill_max_abs"], m["decode_max_abs"]))
        close = max(m["prefill_rel"], m["decode_rel"]) <= tol.rel
        if exact is not None:
            m["torch_vs_fp32_rel"], m["target_vs_fp32_rel"] = _max_rel(ref, exact), _max_rel(forced, exact)
            close = close or m["target_vs_fp32_rel"] <= 1.5 * m["torch_vs_fp32_rel"]
        m["passed"] = bool(close and m["top1_or_tie"] >= tol.top1
                           and (m["greedy_agree"] >= tol.greedy_fraction * steps or m["greedy_diverged_at_tie"]))
        if tol is not tolerance:
            m["tolerance"] = dataclasses.asdict(tol)
        results[target] = m
    return {"tolerance": dataclasses.asdict(tolerance), "targets": results,
            "passed": all(m["passed"] for m in results.values())}


def print_report(report: dict, title: str = "glmc verify") -> None:
    """The verification table (rich)."""
    from rich.console import Console
    from rich.table import Table
    tol = report["tolerance"]
    oracle = any("target_vs_fp32_rel" in m for m in report["targets"].values())
    table = Table(title=f"{title}\ntolerance: rel {tol['rel']:g}" + (" (or vs fp32 <= 1.5x torch's)" if oracle else "")
                  + f", top-1 >= {tol['top1']:.0%}, greedy >= {tol['greedy_fraction']:.0%} of steps")
    cols = ["target", "prefill max abs", "prefill rel", "decode max abs", "decode rel"]
    cols += ["rel vs fp32: torch / target"] if oracle else []
    for col in cols + ["top-1", "greedy", "result"]:
        table.add_column(col, justify="left" if col == "target" else "right")
    for target, m in report["targets"].items():
        row = [target, f"{m['prefill_max_abs']:.3g}", f"{m['prefill_rel']:.3g}", f"{m['decode_max_abs']:.3g}",
               f"{m['decode_rel']:.3g}"]
        row += [f"{m['torch_vs_fp32_rel']:.3g} / {m['target_vs_fp32_rel']:.3g}"] if oracle else []
        greedy = f"{m['greedy_agree']}/{m['steps']}" + (" (tie)" if m.get("greedy_diverged_at_tie") else "")
        table.add_row(*row, f"{m['top1']:.1%}", greedy,
                      "[green]pass[/green]" if m["passed"] else "[red]FAIL[/red]")
    console = Console()
    console.width = max(console.width, 140)
    console.print(table)
