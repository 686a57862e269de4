"""What every rank runs, rank 0 and the workers alike: join the process group, load and shard, run the steps.

The step protocol (rank 0 drives, every rank runs the same forward in lockstep): rank 0 broadcasts a header
[op, cache id, batch, new tokens, total length, 0, 0, 0] (int64), then for FORWARD one payload
[input_ids | position_ids | attention_mask] (int64, flattened). Each rank keeps its own KV cache per cache id
(its own KV groups only). The collectives inside forward() are the model's: two all-reduces per layer and one
all-gather of the last position's logits.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, KVCache
from glmc.parallel.shard import shard_model

STOP, NEW, FORWARD, FREE = 0, 1, 2, 3
HEADER = 8
SPEC_ENV = "GLMC_TP_SPEC"  # the RankSpec as JSON, for the worker processes
ERROR_ENV = "GLMC_TP_ERROR_FILE"  # where a worker writes its traceback before exiting
# Test hook: "RANK:load" or "RANK:step:K" makes that worker raise at load / at its K-th forward (0-based), so that
# the failure path (a rank that dies, the launcher that must report it and leave no process behind) is exercised
# with real processes.
FAULT_ENV = "GLMC_TP_FAULT"


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """What each rank loads and how it joins the group (rank 0 writes it, the workers read it from SPEC_ENV)."""

    checkpoint: str
    world: int
    dtype: str = "fp32"
    device: str = "cpu"  # cpu | cuda (rank r uses cuda:r)
    family: str | None = None
    max_positions: int | None = None
    threads: int = 1  # torch CPU threads per rank
    timeout_s: float = 600.0  # collectives and start-up

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        return cls(**json.loads(text))

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def torch_device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")


def fault(rank: int, when: str) -> None:
    """Raise the injected fault of FAULT_ENV when it names this rank and moment."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec.split(":", 1) == [str(rank), when]:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


def init_group(spec: RankSpec, rank: int, store: dist.Store) -> None:
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(spec.dist_backend, store=store, rank=rank, world_size=spec.world,
                            timeout=datetime.timedelta(seconds=spec.timeout_s))


def load_shard(spec: RankSpec, rank: int) -> GLMForCausalLM:
    """Load the whole checkpoint on the CPU, keep this rank's shard, move it to the rank's device."""
    from glmc.modeling_patches.checkpoint import load_model
    fault(rank, "load")
    model = load_model(spec.checkpoint, dtype=spec.dtype, device="cpu", family=spec.family,
                       max_positions=spec.max_positions)
    shard_model(model, spec.world, rank)
    return model.to(spec.torch_device(rank)).eval()


class Steps:
    """One rank's side of the step protocol: its shard, its KV caches by id."""

    def __init__(self, model: GLMForCausalLM, rank: int, device: torch.device):
        self.model, self.rank, self.device = model, rank, device
        self.caches: dict[int, KVCache] = {}
        self.forwards = 0

    def header(self, op: int = STOP, cache_id: int = 0, batch: int = 0, seq: int = 0, total: int = 0) -> list[int]:
        """Broadcast the header from rank 0 (its values) and return it on every rank."""
        h = torch.tensor([op, cache_id, batch, seq, total] + [0] * (HEADER - 5), dtype=torch.int64,
                         device=self.device)
        dist.broadcast(h, src=0)
        return [int(v) for v in h.tolist()]

    @torch.inference_mode()
    def run(self, head: list[int], inputs: tuple[torch.Tensor, ...] | None = None) -> Any:
        """Carry out one broadcast header (rank 0 passes the step's inputs); FORWARD returns the logits [B, 1, V]."""
        op, cid, b, s, t = head[:5]
        if op == NEW:
            self.caches[cid] = self.model.empty_cache(b, self.device)
        elif op == FREE:
            self.caches.pop(cid, None)
        elif op == FORWARD:
            if inputs is not None:
                payload = torch.cat([x.reshape(-1).to(torch.int64) for x in inputs]).to(self.device)
            else:
                payload = torch.empty(2 * b * s + b * t, dtype=torch.int64, device=self.device)
            dist.broadcast(payload, src=0)
            ids, pos, mask = payload.split([b * s, b * s, b * t])
            fault(self.rank, f"step:{self.forwards}")
            self.forwards += 1
            logits, self.caches[cid] = self.model(ids.view(b, s), pos.view(b, s), mask.view(b, t), self.caches[cid])
            return logits
        return None


def worker_main() -> int:
    """A worker rank (1..N-1): started by glmc.parallel.backend with RANK, WORLD_SIZE, MASTER_ADDR/PORT and the
    spec in its environment; exits when rank 0 says STOP, when its stdin closes (rank 0 is gone), or on error."""
    import sys
    import threading

    rank = int(os.environ["RANK"])
    spec = RankSpec.from_json(os.environ[SPEC_ENV])
    error_file = Path(os.environ[ERROR_ENV])
    stopping = threading.Event()

    def watch_parent() -> None:  # rank 0 holds our stdin's write end: EOF means it exited (or was killed)
        while os.read(sys.stdin.fileno(), 4096):
            pass
        os._exit(0 if stopping.is_set() else 3)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        torch.set_num_threads(spec.threads)
        model = load_shard(spec, rank)  # before joining: a rank that cannot load exits, and rank 0 sees it
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), spec.world,
                              is_master=False, timeout=datetime.timedelta(seconds=spec.timeout_s))
        store.set(f"hello/{rank}", "1")
        init_group(spec, rank, store)
        device = spec.torch_device(rank)
        steps = Steps(model, rank, device)
        while True:
            head = steps.header()
            if head[0] == STOP:
                stopping.set()
                break
            steps.run(head)
        dist.destroy_process_group()
        return 0
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: rank 0 reports it, workers go quietly
        return 130
    except BaseException:  # noqa: BLE001 - any failure: leave the traceback for rank 0, exit non-zero
        error_file.write_text(traceback.format_exc())
        return 1
