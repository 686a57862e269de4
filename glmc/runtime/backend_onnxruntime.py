"""The ONNX Runtime backend: runs a lowered model through IO binding with the KV cache allocated once, on the device.

The cache never passes through Python or host memory between steps. Its buffers are OrtValues on the session's
device (CPU, or CUDA with `ortvalue_from_shape_and_type(..., "cuda", 0)`), allocated once for `max_batch` rows of
`max_length` positions, and bound to the graph by pointer with the shape of the current step:

- graphs whose past and present are separate tensors (the standard I/O contract, docs/onnx.md: past
  [B, Hkv, P, D] -> present [B, Hkv, P+S, D]) get two buffers per tensor used in turn: the present written by one
  step is, untouched, the past of the next;
- graphs whose past inputs are read only by com.microsoft.GroupQueryAttention (the `onnxruntime` lowering with a
  float cache; or runtime config `kv_cache.past_present_share_buffer: true`) bind one [B, Hkv, max_length, D]
  buffer as both past and present: GQA writes the new positions in place and reads the first T (T from the
  attention mask), so a decode step moves no cache bytes at all. An int8 cache dequantized before attention gets
  the two buffers; one folded into GQA (lower_file(fold_kv8=True)) is shared like a float one.

A batch smaller than `max_batch` binds a prefix of each buffer (rows are outermost, so a prefix is contiguous).
Only the small inputs (ids, positions, mask) go host -> device per step, and only the last position's logits come
back (on CUDA the logits land in a torch buffer sliced on the device).

CUDA graphs (ORT's `enable_cuda_graph`): ORT replays a captured graph only for fixed shapes and addresses. A graph
lowered without padding (runtime config `kv_cache.padding: "none"`) with a shared cache has them at every decode
step: ids and positions [B, 1], the mask bound at its full width [B, max_length] (ones for the T tokens, then
zeros: GQA takes the lengths from the mask's sum), the cache [B, Hkv, max_length, D], and the logits [B, 1, V],
all in device buffers kept per batch size and updated in place. So decode steps run as one graph per batch size
(run option `gpu_graph_id` = B), captured by ORT on first use; prefills run normally (`gpu_graph_id` -1).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmc.artifact import read_runtime_config, session_of
from glmc.errors import GlmcError
from glmc.runtime.generate import check_step

# ONNX type -> (element type for OrtValue/IO binding: numpy type, or the ONNX enum where numpy has none; bytes; torch)
_TYPES: dict[str, tuple[type[np.generic] | int, int, torch.dtype]] = {
    "tensor(float)": (np.float32, 4, torch.float32), "tensor(float16)": (np.float16, 2, torch.float16),
    "tensor(bfloat16)": (16, 2, torch.bfloat16), "tensor(int8)": (np.int8, 1, torch.int8),
    "tensor(uint8)": (np.uint8, 1, torch.uint8), "tensor(float8e4m3fn)": (17, 1, torch.float8_e4m3fn)}


def past_feeds_gqa_only(onnx_path: str | Path, past_names: list[str]) -> bool:
    """True when every past input is read only by com.microsoft.GroupQueryAttention (as its past_key/past_value):
    then ORT can update the cache in place, past and present bound to one buffer."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    wanted = set(past_names)
    readers: dict[str, list] = {n: [] for n in wanted}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in wanted:
                readers[name].append((node.domain, node.op_type, i))
    return all(r and all(d == "com.microsoft" and op == "GroupQueryAttention" and i in (3, 4) for d, op, i in r)
               for r in readers.values())


def providers_for(device: str) -> tuple[list, str, int]:
    """ORT execution providers, device type and id for `cpu`, `cuda` or `cuda:N`."""
    import onnxruntime as ort

    kind, _, index = device.partition(":")
    dev_id = int(index or 0)
    if kind == "cpu":
        return ["CPUExecutionProvider"], "cpu", 0
    if kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GlmcError(f"device {device}: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                            "or use --device cpu")
        return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"], "cuda", dev_id
    raise GlmcError(f"device '{device}': expected cpu, cuda or cuda:N")


@dataclasses.dataclass
class OrtCache:
    """The state of one generation: how many positions the device buffers hold and which buffer is the past."""

    batch: int
    length: int = 0
    parity: int = 0  # separate past/present: which of the two buffers holds the past
    owner: int = 0  # the backend's generation counter when this cache was made (one live cache per backend)
    io: Any = None  # the generation's IO binding; with a shared buffer the cache stays bound from step to step
    kv_bound: bool = False


class OnnxRuntimeBackend:
    """A lowered ONNX model behind the generation loop (`forward` returns last-position float32 logits on CPU)."""

    name = "onnxruntime"
    # set by _describe_io, which __init__ calls
    shared: bool
    past_names: list[str]
    kv_type: type[np.generic] | int

    def __init__(self, onnx_path: str | Path, max_length: int, max_batch: int = 1, device: str = "cpu",
                 max_input_length: int | None = None, threads: int = 0, profile: str | None = None,
                 share_buffer: bool | None = None, session_options: Any = None, cuda_graph: bool | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise GlmcError(f"{self.path}: ONNX model does not exist")
        self.config = read_runtime_config(self.path)
        self.session_spec = session_of(self.path, self.config)  # the session its lowering must run in
        if not self.session_spec.onnxruntime:
            raise GlmcError(f"{self.path}: ONNX Runtime cannot run this model: {self.session_spec.note}")
        self.max_length, self.max_batch = int(max_length), int(max_batch)
        self.max_input_length = int(max_input_length or max_length)
        self.device = device
        providers, self.device_type, self.device_id = providers_for(device)
        if self.device_type == "cuda" and self.config.get("logits_dtype") == "float":
            # a float32 graph is a correctness mode on a GPU: no TF32 matmuls (measured on an H200 with them: the
            # shipped model's logits 1.7e-4 off the CPU's, over the 1e-4 float32 bound)
            providers[0] = (providers[0][0], dict(providers[0][1], use_tf32="0"))
        self._ort = ort
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if profile:  # ORT's own per-node profile (JSON); used to check that no copy nodes run per step
            so.enable_profiling = True
            so.profile_file_prefix = profile
        self.padded = self.config.get("kv_cache", {}).get("padding", "left") != "none"
        if cuda_graph and (self.device_type != "cuda" or self.padded):
            raise GlmcError(f"{self.path}: CUDA graphs need the CUDA device and a graph lowered without padding "
                            "(onnxruntime.padded_batches: false)")
        # CUDA graphs: asked for, or by default where the runtime config promises what they need (checked below)
        want_graph = cuda_graph if cuda_graph is not None else (
            self.device_type == "cuda" and not self.padded and share_buffer is not False
            and self.config.get("kv_cache", {}).get("dtype") not in (None, "float"))
        graph_session = self._open_graph(so, providers) if want_graph else None
        self.cuda_graph = graph_session is not None  # decode steps replay graphs (benchmarks may switch it off)
        self.session = graph_session or self._open(so, providers)
        self._describe_io()
        if share_buffer is None:  # the runtime config's word, else whether the graph allows it
            share_buffer = self.shared or (self.config.get("model", {}).get("target") == "onnxruntime"
                                           and past_feeds_gqa_only(self.path, self.past_names))
        if self.device_type == "cuda" and self.kv_type == np.float32:
            # ORT's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 graph runs it on the CPU EP behind memcpy
            # nodes, where an in-place cache update lands in a copy (measured on an H200: wrong tokens from the
            # second step). Separate past/present buffers stay correct.
            share_buffer = False
        self.shared = bool(share_buffer)
        if self.cuda_graph and not self.shared:
            if cuda_graph:
                raise GlmcError(f"{self.path}: CUDA graphs need a KV buffer shared by past and present (a float16/"
                                "bfloat16 cache, or an int8 one folded into GroupQueryAttention)")
            self.cuda_graph, self.session = False, self._open(so, providers)
        self._graph_session = self.cuda_graph  # the session was made with enable_cuda_graph: every run says its id
        self._run_options: dict[int, Any] = {}  # gpu_graph_id -> ort.RunOptions
        self._graph_inputs: dict[int, dict] = {}  # batch -> device OrtValues of ids/positions/mask + host mask
        self._decode_logits: torch.Tensor | None = None  # fixed address: a captured graph writes here
        self._torch_logits = self.device_type == "cuda" and torch.cuda.is_available()
        self._logits_buffer: torch.Tensor | None = None
        self._logits_at: int | None = None
        self._buffers: list[list[Any]] = []  # per cache tensor: 1 or 2 OrtValues of [max_batch, Hkv, max_length, D]
        self._generation = 0
        self.bound_pointers: set[int] = set()  # every KV pointer ever bound (tests: the same buffers every step)

    def _open(self, so, providers):
        try:
            return self._ort.InferenceSession(str(self.path), so, providers=providers,
                                              disabled_optimizers=list(self.session_spec.disabled_optimizers))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types; say which file failed
            raise GlmcError(f"{self.path}: ONNX Runtime could not load the model: {str(e).splitlines()[0][:400]}"
                            ) from None

    def _open_graph(self, so, providers):
        """A session with CUDA graphs on, or None (with a warning) where ORT refuses them for this graph."""
        try:
            return self._open(so, [("CUDAExecutionProvider", dict(providers[0][1], enable_cuda_graph="1"))]
                              + providers[1:])
        except GlmcError as e:
            warnings.warn(f"CUDA graphs are off: {e}", stacklevel=3)
            return None

    # ------------------------------------------------------------------------------------------ graph I/O

    def _describe_io(self) -> None:
        cfg_in, cfg_out = self.config.get("inputs", {}), self.config.get("outputs", {})
        kv = self.config.get("kv_cache", {})
        self.shared = bool(kv.get("past_present_share_buffer", False))
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.ids_name = cfg_in.get("input_ids", "input_ids")
        self.pos_name = cfg_in.get("position_ids", "position_ids")
        self.mask_name = cfg_in.get("attention_mask", "attention_mask")
        self.logits_name = cfg_out.get("logits", "logits")
        pk, pv = cfg_in.get("past_key_names", "past_key_values.%d.key"), cfg_in.get("past_value_names",
                                                                                       "past_key_values.%d.value")
        ok, ov = cfg_out.get("present_key_names", "present.%d.key"), cfg_out.get("present_value_names",
                                                                                   "present.%d.value")
        self.num_layers = sum(1 for i in range(len(inputs)) if pk % i in inputs)
        for name in (self.ids_name, self.pos_name, self.mask_name):
            if name not in inputs:
                raise GlmcError(f"{self.path}: the graph has no input '{name}' (inputs: {', '.join(inputs)})")
        if self.logits_name not in outputs:
            raise GlmcError(f"{self.path}: the graph has no output '{self.logits_name}'")
        if self.num_layers == 0:
            raise GlmcError(f"{self.path}: the graph has no KV-cache inputs named like '{pk % 0}'")
        self.past_names = [n % i for i in range(self.num_layers) for n in (pk, pv)]
        self.present_names = [n % i for i in range(self.num_layers) for n in (ok, ov)]
        for name in self.present_names:
            if name not in outputs:
                raise GlmcError(f"{self.path}: the graph has no output '{name}'")
        first = inputs[self.past_names[0]]
        if first.type not in _TYPES:
            raise GlmcError(f"{self.path}: KV-cache type {first.type} is not supported by this backend")
        self.kv_type, self.kv_itemsize, _ = _TYPES[first.type]
        dims = first.shape
        if not (isinstance(dims[1], int) and isinstance(dims[3], int)):
            raise GlmcError(f"{self.path}: '{first.name}' needs fixed kv-heads and head-dim dims, has {dims}")
        self.kv_heads, self.head_dim = dims[1], dims[3]
        self.vocab_size = outputs[self.logits_name].shape[-1]
        self.logits_type, _, self.logits_torch = _TYPES.get(outputs[self.logits_name].type, _TYPES["tensor(float)"])
        self.extra_inputs = sorted(set(inputs) - {self.ids_name, self.pos_name, self.mask_name, *self.past_names})
        if self.extra_inputs:
            raise GlmcError(f"{self.path}: inputs this runtime does not know how to feed: {self.extra_inputs}")

    # ------------------------------------------------------------------------------------------ cache

    def _allocate(self) -> None:
        """The KV buffers, once for the backend's limits (kept for its lifetime)."""
        from onnxruntime import OrtValue

        shape = [self.max_batch, self.kv_heads, self.max_length, self.head_dim]
        copies = 1 if self.shared else 2
        self._buffers = [[OrtValue.ortvalue_from_shape_and_type(shape, self.kv_type, self.device_type,
                                                                self.device_id) for _ in range(copies)]
                         for _ in self.past_names]

    @property
    def cache_bytes(self) -> int:
        """Device bytes held by the KV buffers."""
        per = self.max_batch * self.kv_heads * self.max_length * self.head_dim * self.kv_itemsize
        return per * len(self.past_names) * (1 if self.shared else 2)

    def new_cache(self, batch: int) -> OrtCache:
        if batch > self.max_batch:
            raise GlmcError(f"batch of {batch} prompts exceeds the build's max_batch of {self.max_batch} "
                            f"({self.path}); split the batch or rebuild with a larger limits.max_batch")
        if not self._buffers:
            self._allocate()
        self._generation += 1
        return OrtCache(batch=batch, owner=self._generation, io=self.session.io_binding())

    # ------------------------------------------------------------------------------------------ one step

    def _bind_kv(self, io, cache: OrtCache, total: int) -> None:
        b, h, d = cache.batch, self.kv_heads, self.head_dim
        for past, present, bufs in zip(self.past_names, self.present_names, self._buffers, strict=False):
            if self.shared:
                src = dst = bufs[0].data_ptr()
                past_shape = present_shape = [b, h, self.max_length, d]
            else:
                src, dst = bufs[cache.parity].data_ptr(), bufs[1 - cache.parity].data_ptr()
                past_shape, present_shape = [b, h, cache.length, d], [b, h, total, d]
            io.bind_input(past, self.device_type, self.device_id, self.kv_type, past_shape, src)
            io.bind_output(present, self.device_type, self.device_id, self.kv_type, present_shape, dst)
            self.bound_pointers.update((src, dst))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: OrtCache) -> tuple[torch.Tensor, OrtCache]:
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        if cache.owner != self._generation:
            raise GlmcError("this KV cache belongs to an earlier generation on the same backend (one backend runs "
                            "one generation at a time); start a new one with new_cache()")
        if batch != cache.batch or total != cache.length + seq:
            raise GlmcError(f"step shapes do not follow the cache: batch {batch} (cache {cache.batch}), mask of "
                            f"{total} positions for {cache.length} cached + {seq} new")
        check_step(total, seq, cache.length, self.max_length, self.max_input_length, self.path)
        if not self.padded and cache.length == 0 and not bool(attention_mask.all()):
            lengths = attention_mask.sum(1).tolist()
            raise GlmcError(f"{self.path}: this model was compiled without padding support "
                            f"(onnxruntime.padded_batches: false), so the prompts of one batch must have the same "
                            f"length; got lengths {lengths}. Run them separately, or rebuild with "
                            "onnxruntime.padded_batches: true")
        io = cache.io
        graph = self.cuda_graph and seq == 1
        if graph:
            self._bind_graph_inputs(io, input_ids, position_ids, total)
        else:
            io.bind_cpu_input(self.ids_name, np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
            io.bind_cpu_input(self.pos_name, np.ascontiguousarray(position_ids.numpy(), dtype=np.int64))
            io.bind_cpu_input(self.mask_name, np.ascontiguousarray(attention_mask.numpy(), dtype=np.int64))
        if not cache.kv_bound:  # a shared buffer keeps its pointer and shape: bound once per generation
            self._bind_kv(io, cache, total)
            cache.kv_bound = self.shared
        buf = self._bind_logits(io, batch, seq)
        if self._graph_session:
            self.session.run_with_iobinding(io, self._graph_run_options(batch if graph else -1))
        else:
            self.session.run_with_iobinding(io)
        cache.length, cache.parity = total, 1 - cache.parity
        if buf is not None:
            last = buf[:batch * seq * self.vocab_size].view(batch, seq, -1)[:, -1]
            return last.to("cpu", torch.float32, copy=True), cache  # a copy: the buffer is reused next step
        logits = io.get_outputs()[self._logits_index(io)]
        return torch.from_numpy(np.asarray(logits.numpy()[:, -1], dtype=np.float32)), cache

    def _graph_run_options(self, graph_id: int):
        if graph_id not in self._run_options:
            ro = self._ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = ro
        return self._run_options[graph_id]

    def _bind_graph_inputs(self, io, input_ids: torch.Tensor, position_ids: torch.Tensor, total: int) -> None:
        """A decode step's ids, positions and full-width mask, copied into this batch size's device buffers."""
        from onnxruntime import OrtValue

        batch = input_ids.shape[0]
        st = self._graph_inputs.get(batch)
        if st is None:
            def device(a):
                return OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)
            st = {"mask_host": np.zeros((batch, self.max_length), np.int64)}
            st.update(ids=device(np.zeros((batch, 1), np.int64)), pos=device(np.zeros((batch, 1), np.int64)),
                      mask=device(st["mask_host"]))
            self._graph_inputs[batch] = st
        st["ids"].update_inplace(np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
        st["pos"].update_inplace(np.ascontiguousarray(position_ids.numpy(), dtype=np.int64))
        st["mask_host"][:, :total] = 1
        st["mask_host"][:, total:] = 0
        st["mask"].update_inplace(st["mask_host"])
        for name, key in ((self.ids_name, "ids"), (self.pos_name, "pos"), (self.mask_name, "mask")):
            io.bind_ortvalue_input(name, st[key])

    def _bind_logits(self, io, batch: int, seq: int) -> torch.Tensor | None:
        """Bind the logits output to a reused torch buffer (on CUDA always, so that only the last position crosses
        to the host; on CPU for decode steps, so no output list is built per step); None: ORT allocates it. Decode
        steps write to a buffer of their own that never moves (a captured CUDA graph holds its address)."""
        if not (self._torch_logits or seq == 1):
            io.bind_output(self.logits_name, self.device_type, self.device_id)
            return None
        device = f"cuda:{self.device_id}" if self.device_type == "cuda" else "cpu"
        n = batch * seq * self.vocab_size
        if seq == 1:
            if self._decode_logits is None:
                self._decode_logits = torch.empty(self.max_batch * self.vocab_size, dtype=self.logits_torch,
                                                  device=device)
            buf = self._decode_logits
        else:
            if self._logits_buffer is None or self._logits_buffer.numel() < n:
                self._logits_buffer = torch.empty(n, dtype=self.logits_torch, device=device)
            buf = self._logits_buffer
        io.bind_output(self.logits_name, self.device_type, self.device_id, self.logits_type,
                       [batch, seq, self.vocab_size], buf.data_ptr())
        return buf

    def _logits_index(self, io) -> int:
        """Position of the logits among the bound outputs (get_outputs follows the first binding order)."""
        if self._logits_at is None:
            self._logits_at = len(self.present_names)  # the cache outputs were bound before the logits
        return self._logits_at

    # ------------------------------------------------------------------------------------------ rows (serving)
    # A server's scheduler (glmc.serve.slots) keeps one request per row of the shared KV buffers, each at its own
    # length: it prefills a request into its row alone and decodes the occupied rows (a prefix) together.

    @property
    def rows_supported(self) -> str | None:
        """None when step_rows can run this graph, else why not (rows need the KV buffer shared by past and
        present: a separate past/present pair is laid out densely per step, not per row)."""
        if not self.shared:
            return f"{self.path}: past and present are separate KV tensors (rows need a shared GQA buffer)"
        return None

    def kv_row_views(self) -> list[torch.Tensor]:
        """Byte views [max_batch, Hkv, max_length, D * itemsize] (uint8) of the shared KV buffers, zeroed on first
        use, so that a scheduler can move a row or compact its positions (torch ops on the device memory)."""
        if not self._buffers:
            self._allocate()
        views = []
        for bufs in self._buffers:
            ptr, n = bufs[0].data_ptr(), self.max_batch * self.kv_heads * self.max_length * self.head_dim
            nbytes = n * self.kv_itemsize
            if self.device_type == "cuda":
                memory = type("DeviceBytes", (), {"__cuda_array_interface__": {  # what torch.as_tensor reads
                    "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}})()
                flat = torch.as_tensor(memory, device=f"cuda:{self.device_id}")
            else:
                import ctypes
                flat = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)
            views.append(flat.view(self.max_batch, self.kv_heads, self.max_length, self.head_dim * self.kv_itemsize))
        if not getattr(self, "_rows_zeroed", False):  # holes in a row's mask must hold finite numbers (0 * NaN)
            for v in views:
                v.zero_()
            self._rows_zeroed = True
        return views

    def step_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                  first_row: int = 0) -> torch.Tensor:
        """One step on rows [first_row, first_row + B) of the shared KV buffers (bound at their full width, so
        each row keeps its own positions): a prompt into one row (past 0), or one token for each of B rows whose
        attention_mask [B, T] marks the positions each row holds (the new token's included). Where the new
        positions land is the graph's rule: the padded form writes every row's token at T - 1, the unpadded one
        at each row's mask sum - 1. Returns the last position's float32 logits [B, V] on the CPU."""
        why = self.rows_supported
        if why:
            raise GlmcError(why)
        batch, seq = input_ids.shape
        if first_row + batch > self.max_batch:
            raise GlmcError(f"rows {first_row}..{first_row + batch - 1} exceed the build's max_batch of "
                            f"{self.max_batch} ({self.path})")
        check_step(attention_mask.shape[1], seq, attention_mask.shape[1] - seq, self.max_length,
                   self.max_input_length, self.path)
        if not self._buffers:
            self._allocate()
        session = self.session
        assert session is not None  # opened in __init__
        io = session.io_binding()
        io.bind_cpu_input(self.ids_name, np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
        io.bind_cpu_input(self.pos_name, np.ascontiguousarray(position_ids.numpy(), dtype=np.int64))
        io.bind_cpu_input(self.mask_name, np.ascontiguousarray(attention_mask.numpy(), dtype=np.int64))
        shape = [batch, self.kv_heads, self.max_length, self.head_dim]
        offset = first_row * self.kv_heads * self.max_length * self.head_dim * self.kv_itemsize
        for past, present, bufs in zip(self.past_names, self.present_names, self._buffers, strict=True):
            ptr = bufs[0].data_ptr() + offset
            io.bind_input(past, self.device_type, self.device_id, self.kv_type, shape, ptr)
            io.bind_output(present, self.device_type, self.device_id, self.kv_type, shape, ptr)
        buf = self._bind_logits(io, batch, seq)
        if self._graph_session:
            session.run_with_iobinding(io, self._graph_run_options(-1))
        else:
            session.run_with_iobinding(io)
        if buf is not None:
            return buf[:batch * seq * self.vocab_size].view(batch, seq, -1)[:, -1].to("cpu", torch.float32,
                                                                                     copy=True)
        logits = io.get_outputs()[len(self.present_names)]
        return torch.from_numpy(np.asarray(logits.numpy()[:, -1], dtype=np.float32))

    def end_profiling(self) -> str | None:
        """Stop ORT profiling (if on) and return the profile file."""
        return self.session.end_profiling() if self.session.get_session_options().enable_profiling else None
