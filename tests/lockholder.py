"""Another live job holding a bag's extraction lock: a real process, so its pid is alive on this host."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held_bag_lock(locks_dir: Path, bag: str, env: dict):
    """A subprocess that claims `bag` in `locks_dir` and holds it until the block ends (then it is killed,
    leaving its lock file behind as a dead job would). Yields the process."""
    hold = (f"import sys; from qgmil.extract.locks import BagLocks; locks = BagLocks({str(locks_dir)!r}); "
            f"locks.claim({bag!r}); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
