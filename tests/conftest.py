"""Fixtures shared by every test package (keep this small; package-specific ones live beside their tests)."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_umm_env(monkeypatch):
    """No UMM_* variables: configs resolve to their documented defaults."""
    for name in [n for n in os.environ if n.startswith("UMM_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def one_thread():
    """One torch thread for in-process training runs (the CPU is shared with torchrun children)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
