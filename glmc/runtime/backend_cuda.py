"""The cuda backend: runs a GLMForCausalLM's weights with glmc's own kernels (Triton, CUDA C++), a static KV cache and
CUDA graphs.

Same weights and quantization as the torch reference model (`checkpoint.load_model` + `glmc.quantization`), read in
the op's own layout (glmc/kernels/quantized_linear.py). A step is: embedding; per layer the QKV GEMV, QKV bias +
rotary + KV-cache append, attention (decode: the flash-decoding kernel; prefill: torch's SDPA over the cache), the
dense GEMV, residual add + RMSNorm, the gate/up GEMV and SwiGLU (one kernel for int8/int4 weights: the GEMV's
epilogue, its rows interleaved gate/up when the backend is made), the down GEMV, residual add + the next RMSNorm; then
the output layer and the logits (and greedy ids) on the device. Decode steps of each batch size run as one CUDA
graph whose inputs (ids, positions, the cache slot `past`) are device buffers.

The KV cache is one preallocated [layers, max_batch, Hkv, max_length, D] buffer per K and V (the model dtype, or int8
when the model has K/V scales: quantized on append, dequantized in attention, as glmc::kv_cache_quantize/dequantize
do; half the memory), shared by the caches `new_cache` hands out: only the newest cache is live (an older one is
refused). Left-padded batches work: a row's attention mask must be zeros then ones (the generation loop's left
padding); other masks are refused.

`save_cuda_build(model, dir)` writes what a build of this target holds (the weights in the op's layout +
quantization.json + cuda.json); `load_cuda_build(dir)` makes the backend from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from glmc.artifact import cuda_unsupported as unsupported
from glmc.errors import GlmcError
from glmc.kernels import attention as k_attention
from glmc.kernels import norm as k_norm
from glmc.kernels import rotary as k_rotary
from glmc.kernels import sampling as k_sampling
from glmc.kernels._cuda import sm_count
from glmc.kernels.quantized_linear import (
    PackedLinear,
    gate_up_swiglu,
    interleave_gate_up,
    linear_partials,
    pack_linear,
    settle_layout,
    swiglu_fused,
)
from glmc.kernels.rotary import KV8
from glmc.modeling_patches.modeling_chatglm import Fp8Linear, GLMForCausalLM, QuantLinear
from glmc.runtime.generate import check_step

BUILD_FILE = "cuda.json"
FORMAT = 1


@dataclasses.dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: PackedLinear
    dense: PackedLinear
    ln2: torch.Tensor
    up: PackedLinear  # dense_h_to_4h: [gate | up], or (gate, up) row pairs when swiglu_fused
    down: PackedLinear
    swiglu_fused: bool = False  # the up GEMV's epilogue computes SwiGLU (quantized_linear.gate_up_swiglu)


@dataclasses.dataclass
class CudaCache:
    """A handle on the backend's static KV cache: batch, tokens held (`past`), left padding per row (`start`)."""

    batch: int
    epoch: int
    past: int = 0
    start: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor  # [B] int64
    pos: torch.Tensor  # [B] int64
    past: torch.Tensor  # [1] int32: the new token's cache slot
    logits: torch.Tensor  # [B, V] float32
    next_ids: torch.Tensor  # [B] int64 (greedy)


def _check_model(model: GLMForCausalLM) -> None:
    for blk in model.transformer.encoder.blocks():
        for lin in (blk.self_attention.query_key_value, blk.self_attention.dense, blk.mlp.dense_h_to_4h,
                    blk.mlp.dense_4h_to_h):
            if not isinstance(lin, (torch.nn.Linear, QuantLinear, Fp8Linear)) or \
                    getattr(lin, "weight_zero", None) is not None:
                what = "zero points" if isinstance(lin, QuantLinear) else type(lin).__name__
                raise GlmcError(f"cuda backend: its kernels run float, int8/int4 weight-only (symmetric) and fp8 "
                                f"linears, not {what}")
    kv = model.kv_dtype
    why = unsupported(model.config, str(model.dtype), "int8" if kv == torch.int8 else
                      "float" if kv.is_floating_point and kv.itemsize >= 2 else str(kv).replace("torch.", ""))
    if why is not None:
        raise GlmcError(f"cuda backend: {why[1]}")


class CudaBackend:
    """The generation loop's Backend on glmc's CUDA kernels (works on the CPU too under TRITON_INTERPRET=1)."""

    name = "cuda"

    @torch.no_grad()
    def __init__(self, model: GLMForCausalLM, max_batch: int = 16, max_length: int | None = None,
                 cuda_graphs: bool = True, max_input_length: int | None = None):
        _check_model(model)
        c = self.config = model.config
        self.device = model.cos_cache.device
        self.dtype = model.dtype
        self.eps = c.rms_eps
        t = model.transformer
        self.embedding = t.embedding.word_embeddings.weight.detach()
        blocks: list[Any] = list(t.encoder.layers)
        self.layers = [_Layer(blk.input_layernorm.weight.detach(), pack_linear(blk.self_attention.query_key_value),
                              pack_linear(blk.self_attention.dense), blk.post_attention_layernorm.weight.detach(),
                              pack_linear(blk.mlp.dense_h_to_4h), pack_linear(blk.mlp.dense_4h_to_h))
                       for blk in blocks]
        sms = sm_count(self.device)
        for lay in self.layers:
            if swiglu_fused(lay.up, self.dtype, self.device):
                lay.up, lay.swiglu_fused = interleave_gate_up(lay.up), True
            for name in ("qkv", "dense", "up", "down"):  # each linear's decode layout: the mma tiles or the op's rows
                setattr(lay, name, settle_layout(getattr(lay, name), self.dtype, self.device,
                                                 name == "up" and lay.swiglu_fused, sms))
        self.final_ln = t.encoder.final_layernorm.weight.detach()
        self.output = pack_linear(t.output_layer)
        self.cos, self.sin = model.cos_cache, model.sin_cache
        self.max_length = min(max_length or model.max_positions, model.max_positions)
        self.max_input_length = min(max_input_length or self.max_length, self.max_length)
        self.max_batch = max_batch
        self.vocab_size = c.vocab_size
        self.scale = 1.0 / math.sqrt(c.head_dim)
        shape = (c.num_layers, max_batch, c.num_kv_heads, self.max_length, c.head_dim)
        self.kv8 = model.kv_dtype == torch.int8
        self.k_cache = torch.zeros(shape, dtype=model.kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=model.kv_dtype, device=self.device)
        # int8 cache: per layer float32 [Hkv, D] scales; the new tokens' unquantized k/v, [B, Hkv, S, D] (one
        # buffer for every layer: a layer's attention reads them before the next layer's append writes them)
        self.kv_scales = [(KV8.scale(a.k_scale, c.num_kv_heads, c.head_dim),
                           KV8.scale(a.v_scale, c.num_kv_heads, c.head_dim))
                          for a in (blk.self_attention for blk in blocks)] if self.kv8 else []
        new = max_batch * c.num_kv_heads * self.max_input_length * c.head_dim if self.kv8 else 0
        self.kv_new = torch.zeros((2, new), dtype=self.dtype, device=self.device)
        self.start = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, _Graph] = {}
        self.epoch = 0
        self.bits = self.layers[0].qkv.bits if self.layers else 16

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step reads from the weights (every linear with its scales and bias, the output layer)."""
        lins = [lin for lay in self.layers for lin in (lay.qkv, lay.dense, lay.up, lay.down)] + [self.output]
        return sum(lin.nbytes for lin in lins)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static KV cache (K and V, every layer, max_batch rows, max_length tokens; int8 with scales:
        half the fp16 cache's)."""
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # ------------------------------------------------------------------------------------------ Backend Protocol

    def new_cache(self, batch: int) -> CudaCache:
        if not 1 <= batch <= self.max_batch:
            raise GlmcError(f"cuda backend: batch {batch} is outside 1..{self.max_batch} (max_batch of the backend)")
        self.epoch += 1
        return CudaCache(batch, self.epoch)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: CudaCache) -> tuple[torch.Tensor, CudaCache]:
        logits, _ = self._forward(input_ids, position_ids, attention_mask, cache)
        return logits.float().cpu(), cache

    # ------------------------------------------------------------------------------------------ steps

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: CudaCache) -> tuple[int, int, int]:
        if not isinstance(cache, CudaCache) or cache.epoch != self.epoch:
            raise GlmcError("cuda backend: this cache is not the backend's newest (its static KV cache holds one "
                            "batch at a time; call new_cache for each generation)")
        b, s = input_ids.shape
        t = attention_mask.shape[1]
        p = t - s
        if b != cache.batch:
            raise GlmcError(f"cuda backend: batch of {b} rows for a cache made for {cache.batch}")
        if p != cache.past:
            raise GlmcError(f"cuda backend: attention mask of {t} tokens for {s} new ones, but the cache holds "
                            f"{cache.past}")
        check_step(t, s, p, self.max_length, self.max_input_length, "cuda backend")
        mask = attention_mask.detach().cpu()
        if p == 0:
            ones = mask.sum(1)
            start = t - ones
            want = torch.arange(t)[None, :] >= start[:, None]
            if not torch.equal(mask != 0, want) or bool((ones == 0).any()):
                raise GlmcError("cuda backend: each row's attention mask must be zeros then ones (left padding) "
                                "with at least one token")
            cache.start = start.tolist()
            self.start[:b].copy_(start.to(torch.int32))
        elif not bool((mask[:, p:] != 0).all()):
            raise GlmcError("cuda backend: new tokens after the prompt must all be real (attention mask 1)")
        return b, s, p

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: CudaCache) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, p = self._check(input_ids, attention_mask, cache)
        if s == 1 and self.cuda_graphs:
            g = self._graph(b, input_ids, position_ids, p)
            g.graph.replay()
            cache.past += 1
            return g.logits, g.next_ids
        d = self.device
        past = torch.full((1,), p, dtype=torch.int32, device=d)
        logits, ids = self._run(input_ids.to(d).reshape(-1), position_ids.to(d).reshape(-1), b, s, past, p)
        cache.past += s
        return logits, ids

    def _graph(self, b: int, input_ids: torch.Tensor, position_ids: torch.Tensor, p: int) -> _Graph:
        """The decode graph of batch b, its input buffers filled with this step's ids, positions and slot."""
        g = self.graphs.get(b)
        if g is not None:
            g.ids.copy_(input_ids.reshape(-1), non_blocking=True)
            g.pos.copy_(position_ids.reshape(-1), non_blocking=True)
            g.past.fill_(p)
            return g
        d = self.device
        ids = input_ids.reshape(-1).to(d).clone()
        pos = position_ids.reshape(-1).to(d).clone()
        past = torch.full((1,), p, dtype=torch.int32, device=d)
        # warm-up on a side stream (compiles the kernels; computes this very step, so the cache slot it writes is
        # the one the replay writes again with the same values)
        side = torch.cuda.Stream(device=d)
        side.wait_stream(torch.cuda.current_stream(d))
        with torch.cuda.stream(side):
            self._run(ids, pos, b, 1, past, p)
        torch.cuda.current_stream(d).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, next_ids = self._run(ids, pos, b, 1, past, p)
        g = self.graphs[b] = _Graph(graph, ids, pos, past, logits, next_ids)
        return g

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, b: int, s: int, past: torch.Tensor, p: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the device: ids/pos [B*S] -> (float32 logits [B, V], greedy ids [B]). `past` (device int32
        [1]) is the first new token's cache slot; `p` its host value (read by prefill only: decode graphs use
        `past`)."""
        c = self.config
        x = torch.nn.functional.embedding(ids, self.embedding)  # [M, H]: the residual stream, updated in place
        h = k_norm.add_rmsnorm(None, x, self.layers[0].ln1 if self.layers else self.final_ln, self.eps)
        new = (b, c.num_kv_heads, s, c.head_dim)
        for i, lay in enumerate(self.layers):
            kc, vc = self.k_cache[i, :b], self.v_cache[i, :b]
            kv8 = KV8(*self.kv_scales[i], self.kv_new[0, :math.prod(new)].view(new),
                      self.kv_new[1, :math.prod(new)].view(new)) if self.kv8 else None
            part = linear_partials(h, lay.qkv)
            q = k_rotary.qkv_rotary_append(part, lay.qkv.bias, pos, self.cos, self.sin, kc, vc, past, s,
                                           c.num_heads, c.num_kv_heads, kv8=kv8)
            if s == 1:
                a = k_attention.decode_attention(q, kc, vc, self.start[:b], past, c.num_heads, self.scale, kv8=kv8)
            else:
                a = k_attention.prefill_attention(q, kc, vc, self.start, b, s, p, c.num_heads, self.scale, kv8)
            h = k_norm.add_rmsnorm(linear_partials(a, lay.dense), x, lay.ln2, self.eps)
            act = gate_up_swiglu(h, lay.up) if lay.swiglu_fused else \
                k_norm.swiglu(linear_partials(h, lay.up), self.dtype)
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.final_ln
            h = k_norm.add_rmsnorm(linear_partials(act, lay.down), x, nxt, self.eps)
        if s > 1:
            h = h.view(b, s, -1)[:, -1].contiguous()
        return k_sampling.logits_argmax(linear_partials(h, self.output), self.dtype)

    # ------------------------------------------------------------------------------------------ device-side greedy

    @torch.no_grad()
    def generate_greedy(self, prompts: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding with every step's inputs kept on the device: prompts [B, S] (left-padded) -> the
        generated ids [B, steps] (no stop tokens; what the benchmark times). The first token comes from prefill;
        each further one is one CUDA-graph replay plus three tiny device updates, with no host synchronisation."""
        b, s = prompts.shape
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.new_cache(b)
        _, ids = self._forward(prompts, positions, attention_mask, cache)
        out = torch.empty((steps, b), dtype=torch.int64, device=self.device)
        out[0] = ids
        pos = positions[:, -1:].to(self.device) + 1
        mask = torch.ones((b, s + 1), dtype=attention_mask.dtype)
        mask[:, :s] = attention_mask
        if steps == 1:
            return out.T.cpu()
        _, ids = self._forward(ids[:, None], pos, mask, cache)  # captures the graph of this batch if needed
        out[1] = ids
        if not self.cuda_graphs:
            for step in range(2, steps):
                pos = pos + 1
                mask = torch.ones((b, mask.shape[1] + 1), dtype=mask.dtype)
                mask[:, :s] = attention_mask
                _, ids = self._forward(ids[:, None], pos, mask, cache)
                out[step] = ids
            return out.T.cpu()
        g = self.graphs[b]
        if cache.past + steps - 2 > self.max_length:
            raise GlmcError(f"cuda backend: {cache.past + steps - 2} tokens exceed max_length {self.max_length}")
        for step in range(2, steps):
            g.ids.copy_(g.next_ids)
            g.pos.add_(1)
            g.past.add_(1)
            g.graph.replay()
            out[step] = g.next_ids
        cache.past += steps - 2
        return out.T.cpu()


# ---------------------------------------------------------------------------------------------- builds

def quantization_of(model: GLMForCausalLM) -> dict:
    """The quantization.json scheme of a loaded model (what load_model needs to rebuild its layers)."""
    first: Any = model.transformer.encoder.layers[0]
    qkv = first.self_attention.query_key_value
    out: dict = {}
    if isinstance(qkv, QuantLinear):
        out["weights"] = {"bits": qkv.bits, "group_size": qkv.group_size,
                          "include_output": isinstance(model.transformer.output_layer, QuantLinear)}
    elif isinstance(qkv, Fp8Linear):
        out["weights"] = {"bits": 8, "group_size": 0, "include_output": False, "method": "fp8"}
    ks = first.self_attention.k_scale
    if ks is not None:
        out["kv_cache"] = {"granularity": "tensor" if ks.numel() == 1 else ("head" if ks.dim() == 1 else "channel"),
                           "dtype": "int8"}
    return out


# What a cuda build needs to run (manifest["engines"]["cuda"]): the kernels are Triton's, compiled on first use
# for the GPU at hand; tensor-core dots on fp16/bf16 need compute capability 8.0 (Ampere) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)
NEEDS = {"compute_capability": f">= sm{MIN_COMPUTE_CAPABILITY[0]}{MIN_COMPUTE_CAPABILITY[1]}",
         "python": ["triton>=3.4", "torch with CUDA"], "install": "pip install -e '.[cuda]'"}


def save_cuda_build(model: GLMForCausalLM, out_dir: str | Path, max_batch: int = 16,
                    max_length: int | None = None, max_input_length: int | None = None) -> Path:
    """Write a cuda build's weights into `out_dir`: the model's tensors in the op's layout (safetensors, the
    kernels read them as they are), quantization.json, and cuda.json (format, dtype, limits). Needs neither CUDA
    nor triton (the compile pipeline runs it on CPU machines)."""
    from glmc.modeling_patches.checkpoint import save_checkpoint

    _check_model(model)
    out = Path(out_dir)
    save_checkpoint(model, out, layout="safetensors", quantization=quantization_of(model) or None)
    length = min(max_length or model.max_positions, model.max_positions)
    meta = {"format": FORMAT, "dtype": str(model.dtype).replace("torch.", ""), "max_batch": max_batch,
            "max_length": length, "max_input_length": min(max_input_length or length, length),
            "family": model.config.family, "quantization": quantization_of(model), "needs": NEEDS}
    (out / BUILD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def runnable(device: str = "cuda") -> str | None:
    """None when this machine can run a cuda build, else why not (no triton, no CUDA GPU, too old a GPU)."""
    from glmc.kernels import available
    why = available()
    if why is not None:
        return why
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_COMPUTE_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is sm{cap[0]}{cap[1]}; the cuda engine needs "
                f"{NEEDS['compute_capability']}")
    return None


def load_cuda_build(build_dir: str | Path, device: str = "cuda", max_batch: int | None = None,
                    max_length: int | None = None, cuda_graphs: bool = True,
                    max_input_length: int | None = None) -> CudaBackend:
    """A CudaBackend from a directory save_cuda_build wrote (limits default to the build's; larger ones are
    refused)."""
    from glmc.modeling_patches.checkpoint import load_model

    d = Path(build_dir)
    meta_file = d / BUILD_FILE
    if not meta_file.is_file():
        raise GlmcError(f"{d}: not a cuda build ({BUILD_FILE} missing)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise GlmcError(f"{meta_file}: format {meta.get('format')} is not {FORMAT} (rebuild the cuda target)")
    for name, asked, limit in (("max_batch", max_batch, meta["max_batch"]), ("max_length", max_length,
                                                                             meta["max_length"])):
        if asked is not None and asked > limit:
            raise GlmcError(f"{d}: {name} {asked} exceeds the cuda build's {limit}")
    length = max_length or meta["max_length"]
    model = load_model(d, dtype=meta["dtype"], device=device, family=meta.get("family"), max_positions=length)
    return CudaBackend(model, max_batch=max_batch or meta["max_batch"], max_length=length, cuda_graphs=cuda_graphs,
                       max_input_length=max_input_length or meta.get("max_input_length"))
