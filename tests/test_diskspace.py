"""DiskFullError: checked before writing, and ENOSPC / EDQUOT turned into one clear error."""

from __future__ import annotations

import errno
import pickle
import shutil
from collections import namedtuple

import pytest

from handgrad import diskspace
from handgrad.diskspace import (
    DiskFullError,
    check_free_space,
    disk_full_guard,
    format_bytes,
    free_bytes,
    raise_if_disk_full,
)

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def free_5mb(monkeypatch):
    seen = []

    def fake(path):
        seen.append(path)
        return Usage(10**9, 10**9 - 5_000_000, 5_000_000)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", fake)
    return seen


def test_format_bytes():
    assert format_bytes(999) == "999 bytes"
    assert format_bytes(5_000_000) == "5.00 MB"
    assert format_bytes(1_499_000_000) == "1.50 GB"
    assert format_bytes(3 * 10**15) == "3000.00 TB"


def test_check_free_space_refuses_with_numbers(tmp_path, free_5mb):
    check_free_space(tmp_path, 4_000_000, "a thing")  # fits: no error
    with pytest.raises(DiskFullError) as info:
        check_free_space(tmp_path, 6_000_000, "checkpoint step_2", "latest still names step_1")
    e = info.value
    assert str(e) == (
        f"No space left on device for checkpoint step_2 in {tmp_path}: needs 6.00 MB, "
        "5.00 MB free; latest still names step_1"
    )
    assert e.errno == errno.ENOSPC and isinstance(e, OSError)
    assert (e.needed, e.free, e.what, e.directory) == (
        6_000_000,
        5_000_000,
        "checkpoint step_2",
        tmp_path,
    )


def test_free_bytes_of_a_directory_not_created_yet(tmp_path, free_5mb):
    assert free_bytes(tmp_path / "a" / "b") == 5_000_000
    assert free_5mb[-1] == tmp_path  # asked about the nearest existing ancestor


@pytest.mark.parametrize("code", sorted(diskspace.DISK_FULL_ERRNOS))
def test_enospc_and_edquot_become_disk_full(tmp_path, free_5mb, code):
    with pytest.raises(DiskFullError) as info:
        with disk_full_guard("model card", tmp_path, 7_000_000, note=lambda: "read late"):
            raise OSError(code, "No space left on device")
    assert str(info.value) == (
        f"No space left on device for model card in {tmp_path}: needs 7.00 MB, 5.00 MB free; "
        "read late"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with disk_full_guard("x", tmp_path):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(ValueError):
        with disk_full_guard("x", tmp_path):
            raise ValueError("not an OSError")
    raise_if_disk_full(OSError(errno.EIO, "io"), "x", tmp_path)  # returns: not disk-full


def test_unknown_size_and_unknown_free(tmp_path, monkeypatch):
    def broken(path):
        raise OSError(errno.EIO, "statvfs failed")

    monkeypatch.setattr(shutil, "disk_usage", broken)
    with pytest.raises(DiskFullError) as info:
        raise_if_disk_full(OSError(errno.ENOSPC, "full"), "shards", tmp_path)
    assert str(info.value) == f"No space left on device for shards in {tmp_path}"


def test_pickles_across_processes(tmp_path):
    e = DiskFullError("msg", "what", tmp_path, 1, 2)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is DiskFullError and str(back) == "msg" and back.needed == 1
