"""Shared fixtures: every test gets its own cache and runs folder, never the user's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        # Triton kernels run on the CPU in Triton's interpreter; Triton reads this when it is first
        # imported (tests that need it absent delete it: lmrun checks it at call time)
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLE_PAGES = REPO / "examples" / "pages"  # the README's example HTML pages, also read by the curation tests


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tests use tiny shapes: one intra-op thread is faster for them than two and avoids OpenMP
    spin contention when other processes (pytest-xdist workers, CI) share the 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_workspace(tmp_path, monkeypatch):
    """cwd = a fresh folder (runs/ and multiruns/ land there); LMRUN_CACHE = a fresh cache."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LMRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    return work


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return Path(os.environ["LMRUN_CACHE"])


@pytest.fixture
def small_text(tmp_path) -> Path:
    """A small real text (the first 60 KB of the embedded Shakespeare, cut at a line)."""
    src = REPO / "lmrun" / "data" / "corpora" / "tinyshakespeare.txt"
    data = src.read_bytes()[:60_000]
    data = data[: data.rfind(b"\n") + 1]
    path = tmp_path / "small.txt"
    path.write_bytes(data)
    return path


def pytest_collection_modifyitems(config, items):
    """The README's commands (tests/test_readme.py, minutes long) run first, so that pytest-xdist
    runs the other tests beside that one instead of after it."""
    items.sort(key=lambda item: item.get_closest_marker("readme") is None)
