"""One ``sdswarm up`` per data dir (issue 15, item 6): the lock refuses a second one while
the first lives, names its pid, and goes with the process that held it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.embedded import LOCK_FILE, DataDirInUseError, lock_data_dir

pytestmark = pytest.mark.integration


def test_a_data_dir_in_use_is_refused_until_its_lock_is_released(tmp_path: Path) -> None:
    held = lock_data_dir(tmp_path)
    with pytest.raises(
        DataDirInUseError, match=f"in use by another sdswarm up \\(pid {os.getpid()}\\)"
    ):
        lock_data_dir(tmp_path)
    held.close()  # what the kernel does when the holder dies, kill -9 included
    again = lock_data_dir(tmp_path)
    assert f"{os.getpid()}\n" == (tmp_path / LOCK_FILE).read_text()
    again.close()
