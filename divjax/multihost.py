"""One run over several processes (hosts): JAX's multi-controller runtime.

`divjax run --distributed` starts one process per host, each running the same program on the
same config (DESIGN.md section 7). `jax.distributed.initialize` connects them; the node axis
of the mesh (divjax.sharding) then spans every process's devices, so each host trains its own
block of nodes and XLA moves messages between hosts with its collectives (NCCL on GPUs, gloo
on CPUs).

What the processes share and what only process 0 does:
* every process computes: the chunks, the evaluation, and the host reads of sharded arrays
  (sharding.to_host all-gathers them, so every process makes the same calls in step);
* only process 0 writes: config.yaml, metrics.jsonl, summary.json, the figure and the
  checkpoints. The other processes gather the state at each checkpoint (a collective) and
  discard it;
* `--resume` reads the checkpoint on every process, so the run directory must be on a file
  system all hosts see (as it would be on a cluster).

A process-0 checkpoint holds the whole state, gathered, exactly as a one-process run writes
it: a distributed run can be resumed by one process, and the other way round.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Process(NamedTuple):
  index: int   # this process, 0 .. count - 1; process 0 writes the outputs
  count: int

  @property
  def primary(self) -> bool:
    return self.index == 0


SINGLE = Process(0, 1)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> Process:
  """Connects this process to the others (jax.distributed.initialize) before any JAX backend
  starts. Arguments left None are found by JAX: from $JAX_COORDINATOR_ADDRESS, or from Slurm,
  Open MPI or a TPU pod's environment. Raises ValueError (naming the option) when JAX cannot.
  """
  import jax
  # CPU devices of different processes talk through gloo (XLA's default CPU runtime has no
  # cross-process collectives); on GPUs and TPUs this setting is not used
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except (ValueError, RuntimeError) as e:
    raise ValueError(f"--distributed: JAX could not start the multi-process runtime ({e}); pass "
                     f"--coordinator HOST:PORT --num-processes P --process-id I, or run under Slurm / "
                     f"Open MPI") from None
  # Known here without starting a backend (jax.process_count() would start one, and the CPU
  # device count must still be set after this): the runtime's own record of the values.
  from jax._src import distributed
  state = distributed.global_state
  return Process(int(state.process_id), int(state.num_processes))
