import os

import pytest

from p2pcache.store.lock import DataRootInUse, lock_data_root


def test_one_holder_per_data_root_even_when_its_pid_file_is_deleted(tmp_path):
    fd = lock_data_root(tmp_path)
    assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    with pytest.raises(DataRootInUse, match=f"pid {os.getpid()}"):
        lock_data_root(tmp_path)
    # found in review: a clean-up deleting DATA/lock let a second node lock a new file of that name and start
    (tmp_path / "lock").unlink()
    with pytest.raises(DataRootInUse):
        lock_data_root(tmp_path)
    os.close(fd)
    os.close(lock_data_root(tmp_path))  # released with its descriptor
