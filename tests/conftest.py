"""Shared fixtures: deterministic seeds and small CPU threads."""

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# The compiled ops fill their outputs with NaN before writing them (csrc/include/equifast/poison.h),
# so that any element a kernel leaves unwritten fails the comparison instead of passing on stale
# heap memory that held the right values from an earlier call.
os.environ.setdefault("EQUIFAST_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def recorded_bars(monkeypatch):
    """The tqdm progress bars the code under test makes (``tqdm.auto.tqdm``, which equifast
    imports where it shows one), in order; each has ``closed_at``, its ``(n, total, postfix)``
    when first closed (tqdm closes a bar again when it is collected)."""
    import tqdm.auto

    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def close(self):
            if not hasattr(self, "closed_at"):
                self.closed_at = (self.n, self.total, self.postfix)
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return bars


@pytest.fixture
def make_unwritable(monkeypatch):
    """``make_unwritable(folder)``: ``folder`` takes no new file. Where its mode does not stop
    this process (root ignores it), the write check (``tempfile.mkstemp`` there) fails as it
    fails on a read-only folder. The modes are restored after the test (so that pytest can
    remove its temporary folders)."""
    locked: list[Path] = []

    def unwritable(folder: Path) -> None:
        folder.chmod(0o555)
        locked.append(folder)
        if not os.access(folder, os.W_OK):
            return
        mkstemp = tempfile.mkstemp

        def refuse(*args, **kwargs):
            if Path(kwargs.get("dir", "")) == folder:
                raise PermissionError(errno.EACCES, "Permission denied")
            return mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)

    yield unwritable
    for folder in locked:
        folder.chmod(0o755)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
