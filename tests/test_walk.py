"""Walking and change detection, without a model."""

from __future__ import annotations

import os

import pytest

from conftest import posix_only

from itrcli.ingest import walk as walk_module
from itrcli.ingest.images import IMAGE_EXTENSIONS
from itrcli.ingest.walk import Entry, plan, walk
from itrcli.records import StoredFile


@pytest.fixture(autouse=True, params=[True, False], ids=["by-descriptor", "by-path"])
def listing(request, monkeypatch):
    """Every test twice: directories listed through a descriptor (entries stat'ed by bare
    name) and by path (where scandir takes no descriptor)."""
    monkeypatch.setattr(walk_module, "_LIST_BY_FD", request.param)
    return request.param


def touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_walk_finds_images_recursively_and_skips_hidden(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "sub" / "b.PNG")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden" / "c.jpg")
    touch(tmp_path / ".d.jpg")
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS)
    assert sorted(os.path.relpath(p, tmp_path) for p in r.files) == ["a.jpg", os.path.join("sub", "b.PNG")]
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS, include_hidden=True)
    assert len(r.files) == 4


def test_walk_exclude_globs(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "a.thumb.jpg")
    touch(tmp_path / "cache" / "x.jpg")
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS, exclude=["*.thumb.jpg", "cache"])
    assert [os.path.basename(p) for p in r.files] == ["a.jpg"]


@posix_only("makes symbolic links, which need privileges on Windows")
def test_symlinked_dirs_followed_only_on_request_and_never_loop(tmp_path):
    touch(tmp_path / "real" / "a.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path, tmp_path / "real" / "loop")  # a loop back to the root
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS)
    assert [os.path.relpath(p, tmp_path) for p in r.files] == [os.path.join("real", "a.jpg")]
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS, follow_symlinks=True)
    assert len(r.files) == 1  # the same directory is entered once, whatever the route


@posix_only("makes symbolic links, which need privileges on Windows")
def test_broken_symlink_is_reported_not_fatal(tmp_path):
    touch(tmp_path / "a.jpg")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS)
    assert len(r.files) == 1
    assert [os.path.basename(p) for p, _ in r.errors] == ["broken.jpg"]


def test_missing_root_is_an_error_and_unlisted(tmp_path):
    r = walk([str(tmp_path / "nope")], extensions=IMAGE_EXTENSIONS)
    assert r.errors and r.unlisted == [str(tmp_path / "nope")]


def test_plan_classifies_changes():
    found = {
        "/p/same.jpg": Entry("/p/same.jpg", 10, 1),
        "/p/edited.jpg": Entry("/p/edited.jpg", 11, 2),
        "/p/new.jpg": Entry("/p/new.jpg", 5, 3),
    }
    known = {
        "/p/same.jpg": StoredFile(1, 10, 1, "h1"),
        "/p/edited.jpg": StoredFile(2, 10, 1, "h2"),
        "/p/gone.jpg": StoredFile(3, 10, 1, "h3"),
        "/other/x.jpg": StoredFile(4, 10, 1, "h4"),  # not under the walked root: untouched
        "/p/unreadable/y.jpg": StoredFile(5, 10, 1, "h5"),  # its directory could not be listed
    }
    p = plan(found, known, ["/p"], unlisted=["/p/unreadable"])
    assert p.unchanged == ["/p/same.jpg"]
    assert p.changed == ["/p/edited.jpg"]
    assert p.new == ["/p/new.jpg"]
    assert p.missing == ["/p/gone.jpg"]


def test_plan_does_not_confuse_sibling_prefixes():
    known = {"/photos2/a.jpg": StoredFile(1, 1, 1, "h")}
    assert plan({}, known, ["/photos"]).missing == []


@posix_only("makes symbolic links, which need privileges on Windows")
def test_extensions_are_read_as_splitext_reads_them(tmp_path):
    from itrcli.ingest.walk import extension

    names = ["a.jpg", "B.JPG", ".d.jpg", "..jpg", ".jpg", "...png", "x.jpg.txt", "x.txt.jpg",
             "noext", "a.", ".", "..", ".a.b.PNG", "e\u0301.Png"]
    for n in names:
        assert extension(n) == os.path.splitext(n)[1].lower(), n
    for n in names:
        if n not in (".", ".."):
            touch(tmp_path / "plain" / n)
    (tmp_path / "dir.jpg").mkdir()
    touch(tmp_path / "dir.jpg" / "inside.png")
    os.symlink(tmp_path / "dir.jpg", tmp_path / "plain" / "link.jpg")  # a directory: not a file
    for hidden in (False, True):
        r = walk([str(tmp_path / "plain")], extensions=IMAGE_EXTENSIONS, include_hidden=hidden)
        want = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                      and (hidden or not n.startswith(".")))
        assert sorted(os.path.basename(p) for p in r.files) == want and not r.errors
        assert all(e.path == p and e.size == 1 for p, e in r.files.items())


@posix_only("reads /proc (Linux)")
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_the_walk_closes_every_directory_it_opens(tmp_path):
    for i in range(60):
        touch(tmp_path / f"d{i % 6}" / f"e{i}" / "a.jpg")
    os.symlink(tmp_path / "d0", tmp_path / "d1" / "loop")  # a second route, not followed
    before = len(os.listdir("/proc/self/fd"))
    for follow in (False, True):
        res = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS, follow_symlinks=follow)
        assert len(res.files) == 60 and not res.errors
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_directory_holding_a_library_is_skipped_whole(tmp_path):
    """Any folder with an ``itr.db`` (this library or another) is not walked: its
    thumbnails and anything else under it are not photos to index."""
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "itr-library" / "itr.db")
    touch(tmp_path / "itr-library" / "thumbs" / "ab" / "abcd.jpg")
    touch(tmp_path / "itr-library" / "stray.jpg")
    touch(tmp_path / "trip" / "b.jpg")
    touch(tmp_path / "trip" / "old-lib" / "itr.db")
    touch(tmp_path / "trip" / "old-lib" / "thumbs" / "c.jpg")
    touch(tmp_path / "trip" / "itr.db.jpg")  # a photo whose name only starts like one
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS)
    assert sorted(os.path.relpath(p, tmp_path) for p in r.files) == [
        "a.jpg", os.path.join("trip", "b.jpg"), os.path.join("trip", "itr.db.jpg")]
    assert sorted(r.libraries) == [str(tmp_path / "itr-library"), str(tmp_path / "trip" / "old-lib")]
    assert not r.errors and not r.unlisted  # what was indexed there before is pruned


def test_unreadable_media_types_are_counted_by_extension(tmp_path):
    from itrcli.constants import MEDIA_EXTENSIONS

    touch(tmp_path / "a.jpg")
    for n in ("x.dng", "y.DNG", "z.heic", "sub/w.cr3", ".hidden.dng", "skip/v.dng", "notes.txt"):
        touch(tmp_path / n)
    (tmp_path / "folder.dng").mkdir()  # a directory: not a file
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS, exclude=["skip"],
             count=MEDIA_EXTENSIONS)
    assert list(r.files) == [str(tmp_path / "a.jpg")]
    assert r.passed_over == {".dng": 2, ".heic": 1, ".cr3": 1}
    # what the run reads is never counted, whatever ``count`` holds
    r = walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS | {".heic"}, count=MEDIA_EXTENSIONS)
    assert r.passed_over == {".dng": 3, ".cr3": 1} and len(r.files) == 2
    assert walk([str(tmp_path)], extensions=IMAGE_EXTENSIONS).passed_over == {}
