"""The TensorRT backend: runs a build's engine with `execute_async_v3` on device buffers, the KV cache kept on the GPU.

UNVERIFIED HERE: the engines this project builds come from TensorRT for RTX, which does not run on the only GPUs
we have (H100/H200, SM90: "compute capability 9.0 not supported"), and the build machine has no GPU at all. The
code follows the TensorRT 10 / TensorRT-for-RTX Python API (`tensorrt` when importable, else
`tensorrt_rtx_bindings`); its tests skip with the reason "no GPU that can run TensorRT engines".

Buffers are torch CUDA tensors (TensorRT's Python API allocates nothing): for each cache tensor two
[max_batch, Hkv, max_length, D] buffers used in turn, as in the ONNX Runtime backend (the tensorrt lowering's
Attention-23 graph has separate past and present tensors); a batch smaller than max_batch uses a prefix. Per step
only the ids, positions and mask go host -> device, and the last position's logits come back. The engine's
optimization profiles (full / prefill / decode) are chosen per step: the first whose ranges admit the shapes.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

import torch

from glmc.errors import GlmcError
from glmc.runtime.generate import check_step

_TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "FP8": torch.float8_e4m3fn}


@dataclasses.dataclass
class TrtCache:
    batch: int
    length: int = 0
    parity: int = 0
    owner: int = 0


class TensorRTBackend:
    """A serialized TensorRT engine behind the generation loop."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, engine_info: dict | None = None, max_length: int = 2048,
                 max_batch: int = 1, max_input_length: int | None = None, device: str = "cuda"):
        info = engine_info or {}
        lib = info.get("library")
        found: ModuleType | None = None
        for name in ([lib] if lib else []) + ["tensorrt", "tensorrt_rtx_bindings"]:
            try:
                found = importlib.import_module(name)
                break
            except ImportError:
                continue
        if found is None:
            raise GlmcError("the tensorrt backend needs `tensorrt` or `tensorrt_rtx_bindings` importable")
        self.trt: ModuleType = found
        if not torch.cuda.is_available():
            raise GlmcError("the tensorrt backend needs a CUDA GPU, and torch sees none")
        self.path = Path(engine_path)
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.max_length, self.max_batch = int(max_length), int(max_batch)
        self.max_input_length = int(max_input_length or max_length)
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise GlmcError(f"{self.path}: TensorRT could not deserialise the engine on "
                                f"{torch.cuda.get_device_name(self.device)} (built for another GPU or TensorRT "
                                "version? see the log above)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self._describe_io()
        self._buffers: list[list[torch.Tensor]] = []
        self._generation = 0
        self._profile = -1

    def _describe_io(self) -> None:
        trt, e = self.trt, self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.inputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _TORCH_TYPES[str(e.get_tensor_dtype(n)).split(".")[-1]] for n in names}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self.past_names) // 2
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        missing = [n for n in ["input_ids", "position_ids", "attention_mask", *self.past_names] if n not in self.inputs]
        missing += [n for n in ["logits", *self.present_names] if n not in self.outputs]
        if missing or self.num_layers == 0:
            raise GlmcError(f"{self.path}: engine I/O does not follow the glmc contract (missing {missing[:4]})")
        shape = e.get_tensor_shape(self.past_names[0])
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = self.dtypes[self.past_names[0]]
        self.vocab_size = int(e.get_tensor_shape("logits")[-1])

    def new_cache(self, batch: int) -> TrtCache:
        if batch > self.max_batch:
            raise GlmcError(f"batch of {batch} prompts exceeds the build's max_batch of {self.max_batch} ({self.path})")
        if not self._buffers:
            shape = (self.max_batch, self.kv_heads, self.max_length, self.head_dim)
            self._buffers = [[torch.empty(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2)]
                             for _ in self.past_names]
            rows = self.max_batch * self.max_input_length
            self._logits = torch.empty(rows * self.vocab_size, dtype=self.dtypes["logits"], device=self.device)
        self._generation += 1
        return TrtCache(batch=batch, owner=self._generation)

    def _select_profile(self, shapes: dict[str, tuple]) -> None:
        e = self.engine
        for p in range(e.num_optimization_profiles):
            ok = True
            for name, shape in shapes.items():
                lo, _, hi = e.get_tensor_profile_shape(name, p)
                if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi, strict=False)):
                    ok = False
                    break
            if ok:
                if p != self._profile:
                    self.context.set_optimization_profile_async(p, self.stream.cuda_stream)
                    self._profile = p
                return
        raise GlmcError(f"{self.path}: no optimization profile of the engine admits these shapes: {shapes}")

    def forward(self, input_ids, position_ids, attention_mask, cache: TrtCache):
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        if cache.owner != self._generation:
            raise GlmcError("this KV cache belongs to an earlier generation on the same backend")
        check_step(total, seq, cache.length, self.max_length, self.max_input_length, self.path)
        kv_past = (batch, self.kv_heads, cache.length, self.head_dim)
        with torch.cuda.stream(self.stream):  # the small inputs are copied on the engine's stream
            small = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
            small = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in small.items()}
            shapes = {n: tuple(t.shape) for n, t in small.items()} | {n: kv_past for n in self.past_names}
            self._select_profile(shapes)
            for name, shape in shapes.items():
                self.context.set_input_shape(name, shape)
            for name, t in small.items():
                self.context.set_tensor_address(name, t.data_ptr())
            for past, present, bufs in zip(self.past_names, self.present_names, self._buffers, strict=False):
                self.context.set_tensor_address(past, bufs[cache.parity].data_ptr())
                self.context.set_tensor_address(present, bufs[1 - cache.parity].data_ptr())
            self.context.set_tensor_address("logits", self._logits.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise GlmcError(f"{self.path}: TensorRT execute_async_v3 failed (see the log above)")
            logits = self._logits[: batch * seq * self.vocab_size].view(batch, seq, self.vocab_size)[:, -1]
            out = logits.float().cpu()  # synchronises the stream
        cache.length, cache.parity = total, 1 - cache.parity
        return out, cache
