"""Helpers of the tests that run DDP jobs: free rendezvous ports, memory, the variables."""

from __future__ import annotations

from pathlib import Path

#: The variables Lightning's DDP sets in the process it runs in (``MASTER_PORT`` chosen
#: free, ``MASTER_ADDR``, the ranks): a test that runs DDP in this process clears them first.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK")


def usable_memory() -> int:
    from torchgeo_dofa.runtime import _physical_memory  # RAM, ulimit -v or a cgroup's limit

    return _physical_memory() or 2**62


def rendezvous_port() -> int:
    """A free TCP port for a process group's rendezvous (rank 0 listens on it), taken below the
    kernel's ephemeral range: a port from ``bind(0)`` is released until rank 0 binds it seconds
    later (library imports), and meanwhile the kernel may hand it to any connection on the
    machine (another test's DDP job: rank 0 then failed with EADDRINUSE in a parallel run)."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; elsewhere bind(0) below is the fallback
    for port in random.sample(range(20000, max(low, 20001)), k=min(50, max(low - 20000, 1))):
        with socket.socket() as probe:
            try:  # every address, as rank 0's store listens (a holder on any one refuses)
                probe.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])
