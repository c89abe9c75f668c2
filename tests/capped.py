"""Run a command under an address-space cap (RLIMIT_AS), so that a memory-bomb regression fails fast with
MemoryError instead of exhausting the machine. Importing torch alone takes ~3.3 GB of address space (mostly
mapped libraries, not memory), hence the default cap."""

from __future__ import annotations

import resource
import subprocess
import sys

CAP_GB = 5.0


def run_capped(args: list[str], cap_gb: float = CAP_GB, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m qgmil ARGS` (or `python -c CODE` when args[0] == "-c") under the cap; text output captured."""

    def limit():
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, *args] if args and args[0] == "-c" else [sys.executable, "-m", "qgmil", *args]
    return subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, timeout=timeout, **kwargs)
