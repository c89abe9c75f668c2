"""Per-bag lock files, so that independent jobs (SLURM array tasks, other machines) can share one output folder.

Before encoding a bag a job claims OUT/locks/<bag>.lock; other jobs skip the bag while the lock lives, and take
over a stale one (its job killed on this host, or silent for `stale_after`). The mechanism is `qgmil.locks`,
which the run directories' locks use too.
"""

from ..locks import HEARTBEAT_SECONDS, RECOVER_SECONDS, STALE_MINUTES, Holder, LockBusy, _look, _marker, slurm_job
from ..locks import FileLocks as BagLocks

__all__ = ["HEARTBEAT_SECONDS", "RECOVER_SECONDS", "STALE_MINUTES", "BagLocks", "Holder", "LockBusy", "_look",
           "_marker", "slurm_job"]
