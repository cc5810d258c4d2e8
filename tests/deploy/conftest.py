"""Fixtures for the deploy checks; the helpers live in deploy_helpers.py (importable: this folder goes on sys.path,
since pytest's importlib mode does not put it there and test modules cannot import conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deploy_helpers as h  # noqa: E402


@pytest.fixture(scope="session")
def dockerfile() -> list[h.Instruction]:
    return h.parse_dockerfile()


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return h.render_all()
