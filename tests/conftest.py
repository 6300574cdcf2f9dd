"""Shared test fixtures. Tests use tiny configurations; the licensed FLAME-topology assets are
read from ../shared beside the repository and the tests that need them skip when absent."""
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLAME_DIR = SHARED / "assets" / "flame_topology"

# Tiny tensors: one intra-op thread is as fast and avoids oversubscription on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flame_dir() -> Path:
    """Folder with sampling_template.obj (metres) and vertex_masks2.npz; skips when absent."""
    if not (FLAME_DIR / "sampling_template.obj").exists():
        pytest.skip("licensed FLAME-topology assets not found in ../shared/assets/flame_topology")
    return FLAME_DIR


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
