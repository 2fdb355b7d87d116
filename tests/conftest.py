import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOOPLM_SHARED", REPO.parent / "shared"))
OURO_TINY = SHARED / "fixtures" / "ouro_tiny"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def ouro_tiny_dir():
    if not (OURO_TINY / "model.safetensors").exists():
        pytest.skip(f"fixture folder {OURO_TINY} not found (set LOOPLM_SHARED to the shared/ folder)")
    return OURO_TINY
