"""Rank 0's side: the launcher (one worker process per other rank, torchrun-style) and TensorParallelBackend.

TensorParallelBackend implements the generation loop's Backend protocol in the calling process, which is rank 0:
it owns the tokenizer and sampling, broadcasts each step's inputs and runs its own shard in lockstep with the
workers. Workers are `python -m glmc.parallel` subprocesses with MASTER_ADDR=127.0.0.1, MASTER_PORT (the TCPStore
rank 0 opened on a free port), RANK, LOCAL_RANK, WORLD_SIZE, and NCCL_NVLS_ENABLE=0 (NVLink multicast off).

Shutdown: close() (also at exit and when the backend is garbage-collected) sends STOP and reaps the workers; a
failed collective, a worker that exits, an exception or Ctrl-C in rank 0 kills the workers instead and raises a
GlmcError naming the rank and its error. A worker whose rank 0 disappears (even by SIGKILL) sees its stdin close
and exits, so no process outlives the launcher.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import KVCache
from glmc.parallel.ranks import ERROR_ENV, FORWARD, FREE, NEW, SPEC_ENV, STOP, RankSpec, Steps, init_group, load_shard
from glmc.runtime.generate import check_step
from glmc.runtime.loader import check_limits

STARTUP_TIMEOUT_S = 300.0  # workers must join the group within this (import torch, connect)
_live: list[weakref.ref] = []  # the running backends (one process group per process: at most one)


class RankCache:
    """Rank 0's handle on one KV cache: its own shard's (key, value) per layer; the workers hold theirs by `id`."""

    _ids = itertools.count(1)

    def __init__(self, kv: KVCache):
        self.id = next(self._ids)
        self.kv = kv


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _close_at_exit(ref: weakref.ref) -> None:
    backend = ref()
    if backend is not None and backend.alive:
        backend.close()


def _first_sentence(e: BaseException) -> str:
    """gloo's and NCCL's messages without their source location, cut after the first sentence."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().split("\n")[0]) or type(e).__name__
    return text.split(". ")[0].rstrip(".")


class TensorParallelBackend:
    """A GLM model split over `world` ranks (processes), driven from this process (rank 0)."""

    def __init__(self, spec: RankSpec, max_length: int, max_batch: int | None = None,
                 max_input_length: int | None = None):
        if any((live := ref()) is not None and live.alive for ref in _live):
            raise GlmcError("a tensor-parallel model is already running in this process; close() it first "
                            "(torch.distributed has one default process group per process)")
        if dist.is_initialized():
            raise GlmcError("torch.distributed is already initialised in this process; tensor parallelism starts "
                            "its own process group")
        self.spec, self.world = spec, spec.world
        self.name = f"torch-tp{spec.world}"
        self.tensor_parallel = spec.world
        self.device = spec.torch_device(0)
        self.max_length = max_length
        if max_batch is not None:
            self.max_batch = max_batch
        if max_input_length is not None:
            self.max_input_length = max_input_length
        self.alive = False
        self.steps: Steps | None = None  # rank 0's shard and caches, while the ranks run
        self.procs: list[subprocess.Popen] = []
        self._freed: list[int] = []
        self._busy = False
        self._tmp = Path(tempfile.mkdtemp(prefix="glmc-tp-"))
        self._threads = torch.get_num_threads()
        _live.append(weakref.ref(self))
        # Dropped without close(): kill the workers and leave the group. At exit: close() (the weak reference lets a
        # closed or dropped backend, and its shard, be freed before then).
        self._finalizer = weakref.finalize(self, TensorParallelBackend._reap, self.procs, self._tmp, 0.0, True)
        atexit.register(_close_at_exit, weakref.ref(self))
        try:
            self._start()
        except BaseException:
            self._abort()
            raise

    # ------------------------------------------------------------------------------------------ start / stop

    def _start(self) -> None:
        spec = self.spec
        if spec.device == "cuda" and torch.cuda.device_count() < spec.world:
            raise GlmcError(f"tensor parallel {spec.world} on CUDA needs {spec.world} GPUs; this machine shows "
                            f"{torch.cuda.device_count()}")
        torch.set_num_threads(spec.threads)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, spec.world, is_master=True, wait_for_workers=False, timeout=timeout)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(spec.world),
                   NCCL_NVLS_ENABLE="0", **{SPEC_ENV: spec.to_json()})
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # rank 0 too (this process): NVLink multicast stays off
        for rank in range(1, spec.world):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "glmc.parallel"], stdin=subprocess.PIPE,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), **{ERROR_ENV: str(self._error_file(rank))})))
        model = load_shard(spec, 0)  # while the workers start and load theirs
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = set(range(1, spec.world))
        while waiting:  # every worker says hello (or dies) before the group forms: no wait on a dead rank
            waiting = {r for r in waiting if not store.check([f"hello/{r}"])}
            for r in waiting:
                if self.procs[r - 1].poll() is not None:
                    raise self._failure(f"rank {r} exited before joining")
            if waiting and time.monotonic() > deadline:
                raise self._failure(f"ranks {sorted(waiting)} did not start within {STARTUP_TIMEOUT_S:.0f}s")
            time.sleep(0.02)
        init_group(spec, 0, store)
        self.alive = True
        self.model_config: Any = getattr(model, "full_config")  # noqa: B009 - set by shard_model
        self.vocab_size = self.model_config.vocab_size
        self.steps = Steps(model, 0, self.device)

    def _error_file(self, rank: int) -> Path:
        return self._tmp / f"rank{rank}.err"

    def _failure(self, what: str) -> GlmcError:
        """Kill what is left, and say which rank failed and why (its error file, its exit status)."""
        time.sleep(0.2)  # a worker that just failed is writing its error file and exiting
        lines = []
        for rank, p in enumerate(self.procs, start=1):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
            f = self._error_file(rank)
            err = f.read_text().strip().splitlines() if f.is_file() else []
            if err or p.returncode not in (None, 0):
                lines.append(f"rank {rank} ({_describe_exit(p.returncode)})" + (f": {err[-1]}" if err else ""))
        self._abort()
        detail = "; ".join(lines) or "no worker reported an error"
        return GlmcError(f"tensor parallel ({self.world} ranks): {what}: {detail}")

    @staticmethod
    def _reap(procs: list[subprocess.Popen], tmp: Path, grace: float = 0.0, leave_group: bool = False) -> None:
        """Make sure no worker survives: wait up to `grace` seconds for them to exit, close their stdin (a worker that
        missed everything else sees EOF and exits), then SIGTERM, then SIGKILL."""
        end = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, end - time.monotonic()))
        for p in procs:
            if p.stdin is not None and not p.stdin.closed:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if leave_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)

    def _abort(self) -> None:
        """The hard way out: kill the workers, drop the process group (after an error, an interrupt)."""
        self.alive = False
        self._reap(self.procs, self._tmp)
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group may refuse to be torn down; the process goes on
                dist.destroy_process_group()
        self._release()

    def _release(self) -> None:
        """This process's share of the cleanup: its torch threads back, its shard freed, no finalizer left."""
        torch.set_num_threads(self._threads)
        self._finalizer.detach()
        self.steps = None  # the shard and caches go; a stopped backend refuses calls

    def close(self) -> None:
        """Stop the workers (STOP, then wait) and leave the process group; idempotent."""
        if self.alive and not self._busy and self.steps is not None:
            try:
                self.steps.header(STOP)
                self.alive = False
                self._reap(self.procs, self._tmp, grace=10.0)
                dist.destroy_process_group()
                self._release()
                return
            except Exception:  # noqa: BLE001 - fall through to the hard way
                pass
        self._abort()

    def __enter__(self) -> TensorParallelBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ Backend protocol

    def _running(self) -> Steps:
        if not self.alive or self.steps is None:
            raise GlmcError(f"tensor parallel ({self.world} ranks): the ranks have stopped (closed or failed)")
        return self.steps

    def _call(self, op: int, cache_id: int, batch: int = 0, seq: int = 0, total: int = 0,
              inputs: tuple[torch.Tensor, ...] | None = None) -> Any:
        steps = self._running()
        self._busy = True
        try:
            while self._freed:  # caches rank 0 dropped since the last call: the workers drop theirs
                cid = self._freed.pop()
                steps.run(steps.header(FREE, cid))
            out = steps.run(steps.header(op, cache_id, batch, seq, total), inputs)
        except RuntimeError as e:  # mostly a collective that failed because a peer is gone or broke
            raise self._failure(f"a step failed ({_first_sentence(e)})") from None
        except BaseException:  # Ctrl-C or an error of our own mid-step: the ranks are out of step, stop them all
            self._abort()
            raise
        self._busy = False
        return out

    def new_cache(self, batch: int) -> RankCache:
        handle = RankCache([])
        steps = self._running()
        self._call(NEW, handle.id, batch)
        handle.kv = steps.caches.pop(handle.id)
        weakref.finalize(handle, self._freed.append, handle.id)
        return handle

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: RankCache) -> tuple[torch.Tensor, RankCache]:
        b, s = input_ids.shape
        t = attention_mask.shape[1]
        check_step(t, s, t - s, self.max_length, getattr(self, "max_input_length", self.max_length), self.name)
        if getattr(self, "max_batch", b) < b:
            raise GlmcError(f"batch of {b} exceeds the build's max_batch of {self.max_batch} ({self.name})")
        steps = self._running()
        steps.caches[cache.id] = cache.kv
        try:
            logits = self._call(FORWARD, cache.id, b, s, t, (input_ids, position_ids, attention_mask))
        finally:
            cache.kv = steps.caches.pop(cache.id, cache.kv)
        return logits[:, -1].float().cpu(), cache


def start(checkpoint: str | Path, world: int, dtype: str = "fp32", device: str = "cpu", family: str | None = None,
          max_length: int | None = None, max_batch: int | None = None, threads: int | None = None,
          timeout_s: float = 600.0, max_input_length: int | None = None,
          where: str = "tensor_parallel") -> TensorParallelBackend:
    """Start `world` ranks on a checkpoint directory: this process is rank 0. `device`: cpu (gloo) or cuda (NCCL,
    rank r on cuda:r). `max_length`: the KV cache's reach (default: the model's seq_length). `threads`: torch CPU
    threads per rank (default: the cores shared out among the ranks)."""
    from glmc.modeling_patches.config import load_config
    from glmc.parallel.shard import check_world
    config = load_config(checkpoint, family=family)
    check_world(config, world, where)
    max_length = max_length or config.seq_length
    dev = "cuda" if device.startswith("cuda") else "cpu"
    threads = threads or (max(1, (os.cpu_count() or 1) // world) if dev == "cpu" else 1)
    spec = RankSpec(str(checkpoint), world, dtype, dev, family, max_length, threads, timeout_s)
    return TensorParallelBackend(spec, max_length, max_batch, max_input_length)


def manifest_tensor_parallel(build: Any) -> int:
    """The `parallel.tensor` a build was compiled with (1 for older builds, checkpoints and lone ONNX models)."""
    config = build.manifest.get("config") if isinstance(build.manifest, dict) else None
    section = config.get("parallel") if isinstance(config, dict) else None
    n = section.get("tensor", 1) if isinstance(section, dict) else 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GlmcError(f"{build.root}: manifest config.parallel.tensor is damaged ({n!r}); recompile the build")
    return n


def start_build(build: Any, tensor_parallel: int | None, backend: str = "auto", device: str = "auto",
                max_length: int | None = None, max_batch: int | None = None, dtype: str | None = None,
                threads: int = 0) -> TensorParallelBackend | None:
    """Start the ranks for a build (glmc.artifact.Build) when tensor parallelism is asked for: `tensor_parallel`
    (a flag; None = the build's parallel.tensor). None when it resolves to 1, or when only the manifest asked for
    it and another backend than torch was chosen explicitly (that backend runs on one device)."""
    explicit = tensor_parallel is not None
    n = tensor_parallel if tensor_parallel is not None else manifest_tensor_parallel(build)
    where = "--tensor-parallel" if explicit else f"{build.root}: parallel.tensor"
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GlmcError(f"{where}: tensor-parallel size {n!r} must be an integer >= 1")
    if n == 1:
        return None
    if not explicit and (backend not in ("auto", "torch") or build.named is not None):
        return None  # the manifest's N is a default: an engine chosen by name runs on one device
    if backend not in ("auto", "torch"):
        raise GlmcError(f"{where} {n}: tensor parallelism runs on the torch backend (ONNX Runtime, TensorRT and "
                        f"cuda engines run on one device); drop --backend {backend} or use --tensor-parallel 1")
    if build.named is not None:
        raise GlmcError(f"{where} {n}: {build.root} names one ONNX lowering, which runs on one device; point at "
                        "the build directory")
    if build.checkpoint is None:
        raise GlmcError(f"{where} {n}: the torch backend needs weights, and {build.root} has none outside its ONNX "
                        f"files and its checkpoint {build.manifest.get('model', {}).get('checkpoint')} is not here"
                        + ("" if explicit else "; run it on one device with --tensor-parallel 1"))
    check_limits(build, max_length, max_batch)
    lim = build.limits
    length = max_length or (lim.max_sequence_length if lim else None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "cpu"
    if dtype is None:  # as the single-device torch backend: the build's dtype on GPUs, float32 on the CPU
        dtype = build.dtype if lim and device.startswith("cuda") else "fp32"
    return start(build.checkpoint, n, dtype=dtype, device=device, family=build.family, max_length=length,
                 max_batch=max_batch or (lim.max_batch if lim else None), threads=threads or None,
                 max_input_length=lim.max_input_length if lim else None, where=where)
