"""divjax: asynchronous decentralized learning, simulated in JAX."""

from divjax import xla_cpu as _xla_cpu

_xla_cpu.unroll_threefry()
