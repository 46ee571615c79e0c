"""Fixtures shared by every test package (keep this small; package-specific ones live beside their tests)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_umm_env(monkeypatch):
    """No UMM_* variables: configs resolve to their documented defaults."""
    for name in [n for n in os.environ if n.startswith("UMM_")]:
        monkeypatch.delenv(name)
