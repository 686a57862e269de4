"""Tensor parallelism: one GLM model split Megatron-style over N processes (ranks) that run each step in lockstep.

- `shard.py`: what each rank holds and where the collectives go (torch.distributed all-reduce / all-gather).
- `ranks.py`: what every rank runs: join the group (gloo on CPU, NCCL on GPU), load and shard, the step protocol.
- `backend.py`: the launcher and `TensorParallelBackend`, the generation loop's backend in rank 0.

    from glmc.parallel import start
    backend = start("glmc/assets/glmc-tiny", world=2)   # two processes, gloo
    ... glmc.runtime.generate.generate(backend, prompts, cfg) ...
    backend.close()

`glmc run/bench BUILD --tensor-parallel N` and `glmc.load(..., tensor_parallel=N)` (or a build compiled with
`parallel.tensor: N`) start it for you; docs/parallel.md has the design and the measurements.
"""

from glmc.parallel.backend import TensorParallelBackend, start
from glmc.parallel.shard import ShardPlan, check_world, plan, shard_model

__all__ = ["ShardPlan", "TensorParallelBackend", "check_world", "plan", "shard_model", "start"]
