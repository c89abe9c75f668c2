import os
from pathlib import Path

import pytest
import torch
from slurm import slurm_cluster  # noqa: F401  (the single-node SLURM cluster fixture, tests/slurm.py)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("QGMIL_FIXTURES", REPO.parent / "shared" / "fixtures" / "qgmil_reference"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official-code parity fixtures (../shared beside the repo, or $QGMIL_FIXTURES)."""
    if not (FIXTURES / "manifest.json").exists():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"parity fixtures not found at {FIXTURES}")
        pytest.skip(f"parity fixtures not found at {FIXTURES} (set QGMIL_FIXTURES)")
    return FIXTURES
