"""Where the project meets the hardware: CUDA clusters run megatron-core untouched; CPU-only machines get
the shims of :mod:`vapo_megatron.platform.cpu`.

The shims are installed once per process by its entry point, never as an import side effect: `vapo-train` /
`vapo-generate` (cli.py), the tools' `main`, `parallel.layout.init_distributed` (benchmarks, examples), the test
set-up (tests/conftest.py) and every spawned test rank (testing/dist.py, before it unpickles its function).
Modules that import megatron-core at their top therefore need an entry point to have run first on CPU; the
pure layers (algorithms, config, data) never import it."""
from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("VAPO_FORCE_CPU", "0") != "1"


def install_shims() -> None:
    """Make `import megatron.core` work on this machine (idempotent; nothing happens on CUDA). Called by the
    entry points listed in the module docstring."""
    if not has_cuda():
        from vapo_megatron.platform import cpu

        cpu.install()


def setup() -> str:
    """Prepare this process for megatron-core and return the device type ("cuda" or "cpu").

    Idempotent. On CPU it installs the shims and sets one intra-op thread per rank unless the user set
    OMP_NUM_THREADS (several gloo ranks share the few cores of a laptop)."""
    if has_cuda():
        return "cuda"
    from vapo_megatron.platform import cpu

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cpu.install()
    cpu.activate_device_redirect()
    return "cpu"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def dist_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT of a single-machine process group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
