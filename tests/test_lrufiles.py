"""The one LRU file-cache mechanism behind the thumbnail and re-rank feature caches."""

from __future__ import annotations

import os
import time

from itrcli import lrufiles


def test_atomic_write_touch_list_and_trim(tmp_path):
    root = tmp_path / "cache"
    for i in range(5):
        lrufiles.write_atomic(root / f"{i:02d}" / f"e{i}.bin", bytes(100), sync=i % 2 == 0)
        os.utime(root / f"{i:02d}" / f"e{i}.bin", (1000 + i, 1000 + i))
    lrufiles.touch(root / "00" / "e0.bin")  # the oldest becomes the newest
    (root / "01" / "other.txt").write_text("not an entry")
    found = lrufiles.entries(root, ".bin")
    assert len(found) == 5 and sum(n for _, n, _ in found) == 500
    assert lrufiles.trim(found, cap=500) == (0, 0)  # at the cap: nothing to do
    assert lrufiles.trim(found, cap=450, target=250) == (3, 300)  # e1, e2, e3: least used
    left = sorted(os.path.basename(p) for _, _, p in lrufiles.entries(root, ".bin"))
    assert left == ["e0.bin", "e4.bin"]


def test_a_crashed_writers_temporary_file_is_removed_when_old(tmp_path):
    root = tmp_path / "cache"
    lrufiles.write_atomic(root / "ab" / "x.jpg", b"jpeg")
    fresh, old = root / "ab" / ".y.jpg.1.aa.tmp", root / "ab" / ".z.jpg.2.bb.tmp"
    fresh.write_bytes(b"half")
    old.write_bytes(b"half")
    t = time.time() - 2 * lrufiles.STALE_TMP_SECONDS
    os.utime(old, (t, t))
    assert [os.path.basename(p) for _, _, p in lrufiles.entries(root, ".jpg")] == ["x.jpg"]
    assert fresh.exists() and not old.exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import pytest

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        lrufiles.write_atomic(tmp_path / "c" / "s" / "f.bin", b"data")
    assert list((tmp_path / "c" / "s").iterdir()) == []


def test_no_cache_folder_lists_nothing(tmp_path):
    assert lrufiles.entries(None, ".jpg") == []
    assert lrufiles.entries(tmp_path / "none", ".jpg") == []
