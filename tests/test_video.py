"""Videos: frame selection (PyAV), indexing, search grouping and output, check, bad files.

Clips are written by the tests with PyAV (tests/support/clips.py): shapes that appear at
known times, in H.264, VP9 and MPEG-4, rotated, with a variable frame rate.
"""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from conftest import write_shapes, posix_only

av = pytest.importorskip("av", reason="PyAV not installed: pip install 'itr-search[video]'")

from support import clips  # noqa: E402

from itrcli.ingest import video  # noqa: E402

RED, BLUE, GREEN, YELLOW = (("red", "circle", "left"), ("blue", "square", "right"),
                            ("green", "triangle", "top"), ("yellow", "circle", "bottom"))
SHOTS = [(0.0, RED), (3.0, BLUE), (7.0, GREEN), (12.0, YELLOW)]


def shots_clip(path, codec="h264", **kw):
    """Four shots starting at 0, 3, 7 and 12 s; x264 with its scene-cut keyframes."""
    if codec == "h264":
        kw.setdefault("gop_s", None)
        kw.setdefault("options", {"preset": "veryfast"})
    return clips.write_clip(path, clips.shape_scenes(SHOTS), 15, fps=10, codec=codec, **kw)


def times(v):
    return [round(f.time, 2) for f in v.frames]


# --- frame selection ---------------------------------------------------------------------

@pytest.mark.parametrize("codec,gop", [("h264", None), ("vp9", 1.0), ("mpeg4", 1.0)])
def test_each_shot_is_kept_once_at_its_start(tmp_path, codec, gop):
    p = shots_clip(tmp_path / f"shots{clips.CODECS[codec][1]}", codec, gop_s=gop)
    v = video.select_frames(str(p))
    assert times(v) == [0.0, 3.0, 7.0, 12.0]
    assert (v.width, v.height) == (64, 64) and abs(v.duration - 15) < 0.5
    # keyframes only: far fewer frames decoded than the clip has
    assert v.decoded <= 16 and v.packets == 150


def test_one_frame_per_10_s_where_keyframes_are_farther_apart(tmp_path):
    scenes = [(0.0, RED), (12.0, BLUE), (24.0, GREEN)]
    p = clips.write_clip(tmp_path / "long-gop.mp4", clips.shape_scenes(scenes), 35, fps=5,
                         gop_s=100)  # one keyframe, at 0
    v = video.select_frames(str(p))
    # 10 s shows the first shot again (dropped as a near-duplicate); 20 s and 30 s are new
    assert times(v) == [0.0, 20.0, 30.0]
    assert v.decoded < 175


def test_variable_frame_rate_times_are_exact(tmp_path):
    ts = [0.0, 0.05, 0.5, 1.37, 2.9, 3.31, 3.36, 5.0, 6.99, 7.42, 8.0]
    scenes = [(0.0, RED), (3.31, BLUE), (7.42, GREEN)]
    p = clips.write_clip(tmp_path / "vfr.mp4", clips.shape_scenes(scenes), 8, times=ts,
                         fps=10, gop_s=0.1)  # every frame a keyframe
    assert times(video.select_frames(str(p))) == [0.0, 3.31, 7.42]


def test_display_rotation_is_applied(tmp_path):
    def frame_at(t):
        img = np.zeros((64, 96, 3), dtype=np.uint8)  # stored landscape, a red bar on top
        img[:8] = (255, 0, 0)
        img[30:40, 40:60] = (0, 0, 255)
        return img

    p = clips.write_clip(tmp_path / "portrait.mp4", frame_at, 1, rotation=-90)
    v = video.select_frames(str(p))
    assert (v.width, v.height) == (64, 96)  # shown upright
    img = np.asarray(v.frames[0].image)
    assert img.shape[:2] == (96, 64)
    # -90 (counter-clockwise) = a quarter turn clockwise: the top bar is now on the right
    assert img[:, -3:, 0].mean() > 200 and img[:, :3, 0].mean() < 60
    # the thumbnail path agrees
    thumb = np.asarray(video.frame_at(str(p), 0.0))
    assert thumb.shape[:2] == (96, 64) and thumb[:, -3:, 0].mean() > 200


def test_black_fade_in_is_not_a_frame(tmp_path):
    def frame_at(t):
        if t < 2:
            return np.zeros((64, 64, 3), dtype=np.uint8)
        return clips.shape_scenes([(0, RED)])(t)

    p = clips.write_clip(tmp_path / "fade.mp4", frame_at, 4, gop_s=1)
    assert times(video.select_frames(str(p))) == [2.0]
    black = clips.write_clip(tmp_path / "black.mp4", lambda t: np.zeros((64, 64, 3), np.uint8), 2)
    assert times(video.select_frames(str(black))) == [0.0]  # all blank: one frame still


def test_cover_art_stream_is_ignored(tmp_path):
    p = shots_clip(tmp_path / "shots.mp4")
    out = tmp_path / "with-cover.mp4"
    with av.open(str(p)) as src, av.open(str(out), "w") as dst:
        s_in = src.streams.video[0]
        cover = dst.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        s_out = dst.add_stream_from_template(s_in)
        f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 255, np.uint8), format="rgb24")
        f.pts = 0
        for pkt in [*cover.encode(f), *cover.encode(None)]:
            dst.mux(pkt)
        for pkt in src.demux(s_in):
            if pkt.dts is not None:
                pkt.stream = s_out
                dst.mux(pkt)
    with av.open(str(out)) as c:
        assert any(int(s.disposition) & int(av.stream.Disposition.attached_pic) for s in c.streams.video)
    v = video.select_frames(str(out))
    assert times(v) == [0.0, 3.0, 7.0, 12.0] and (v.width, v.height) == (64, 64)

    # the muxer puts the cover after the video; a file may list it first
    class S:
        def __init__(self, disposition):
            self.disposition = disposition

    class C:
        class streams:
            video = [S(av.stream.Disposition.attached_pic), S(av.stream.Disposition.default)]

    assert video.video_stream(C) is C.streams.video[1]


def test_time_budget_keeps_the_frames_found_so_far(tmp_path, monkeypatch):
    p = shots_clip(tmp_path / "shots.mp4")
    ticks = iter(range(10_000))
    monkeypatch.setattr(video, "_clock", lambda: float(next(ticks)))  # a second per look
    v = video.select_frames(str(p), budget=60)  # ~60 packets: the first 6 s
    assert times(v) == [0.0, 3.0]
    assert v.note.startswith("partly indexed: 2 frames up to 0:03.0, time budget of 60 s spent")


@pytest.mark.parametrize("make,reason", [
    (lambda d: clips.write_audio_only(d / "voice.mp4"), "no video stream (audio only)"),
    (lambda d: (d / "notes.mp4").write_text("not a video at all\n") and d / "notes.mp4",
     "not a readable video"),
])
def test_files_without_a_video_raise_one_line(tmp_path, make, reason):
    with pytest.raises(video.VideoError) as e:
        video.select_frames(str(make(tmp_path)))
    assert str(e.value).startswith(reason) and "\n" not in str(e.value)


# --- indexing and search -------------------------------------------------------------------

@pytest.fixture
def media(tmp_path):
    d = tmp_path / "media"
    photos = write_shapes(d, [(*RED, 1), (*BLUE, 2), (*GREEN, 3)])
    clip = shots_clip(d / "shots.mp4")
    return d, photos, clip


def index(itr, lib, *args):
    r = itr("index", *args, "--db", lib, "--json", "-q")
    assert r.code == 0, r
    return r.json()


def frames_of(lib, name):
    c = sqlite3.connect(lib / "itr.db")
    rows = c.execute("SELECT fr.id, fr.time FROM frames fr JOIN files f ON f.id = fr.file_id "
                     "WHERE f.path LIKE ? ORDER BY fr.time", (f"%{name}",)).fetchall()
    c.close()
    return rows


def check_ok(itr, lib):
    r = itr("check", "--db", lib, "--json")
    assert r.code == 0 and r.json()["ok"], r
    return r.json()


def test_index_search_group_and_formats(itr, micro_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    s = index(itr, lib, d, "-m", micro_clip)
    assert (s["added"], s["skipped"]) == (4, 0)
    assert [round(t, 2) for _, t in frames_of(lib, "shots.mp4")] == [0.0, 3.0, 7.0, 12.0]
    info = itr("info", "--db", lib, "--json").json()
    assert (info["files"], info["videos"], info["frames"], info["vectors"]) == (4, 1, 4, 7)
    assert "videos:    1 (4 frames)" in itr("info", "--db", lib).out
    check_ok(itr, lib)

    # an image query finds the video scene with the same picture, at its time
    r = itr("search", photos[1], "--db", lib, "--json", "-n", "3")
    res = r.json()["results"]
    assert res[0]["path"] == str(clip) and res[0]["time"] == 3.0, res
    assert all(x["time"] is None for x in res if x["path"] != str(clip))
    # once per video; --frames lists each frame
    r = itr("search", "a red circle", "--db", lib, "-n", "10", "--exact")
    lines = r.out.splitlines()
    assert len(lines) == 4 and sum(str(clip) in ln for ln in lines) == 1
    r = itr("search", "a red circle", "--db", lib, "-n", "10", "--exact", "--frames")
    lines = [ln.split("\t") for ln in r.out.splitlines()]
    assert len(lines) == 7
    video_lines = sorted(float(x[2]) for x in lines if x[1] == str(clip))
    assert video_lines == [0.0, 3.0, 7.0, 12.0]
    assert all(len(x) == 2 for x in lines if x[1] != str(clip))
    assert lines[0][0] == f"{float(lines[0][0]):.4f}"
    # HNSW agrees with the exact scan
    r2 = itr("search", "a red circle", "--db", lib, "-n", "10", "--frames")
    assert sorted(r2.out.splitlines()) == sorted(r.out.splitlines())
    # paths alone
    r = itr("search", photos[2], "--db", lib, "--paths", "--frames", "-n", "2")
    assert r.out.splitlines()[0] == str(clip)


def test_video_query_at_a_time(itr, micro_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    # an indexed video: its stored frame; the video itself is not a result
    res = itr("search", clip, "--at", "7.2", "--db", lib, "--json", "-n", "1").json()["results"]
    assert res[0]["path"] == str(photos[2]) and res[0]["time"] is None
    # a video outside the library: the frame there is decoded and embedded
    other = shots_clip(tmp_path / "elsewhere.webm", "vp9", gop_s=1.0)
    res = itr("search", other, "--at", "3.5", "--db", lib, "--json", "-n", "2").json()["results"]
    assert {(x["path"], x["time"]) for x in res} == {(str(photos[1]), None), (str(clip), 3.0)}
    r = itr("search", "a red circle", "--at", "3", "--db", lib)
    assert r.code == 2 and "--at goes with a video query" in r.err


def test_moved_changed_and_deleted_videos(itr, tiny_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", tiny_clip)
    before = frames_of(lib, "shots.mp4")
    moved = d / "sub" / "renamed.mp4"
    moved.parent.mkdir()
    shutil.move(clip, moved)
    s = index(itr, lib, d)
    assert (s["moved"], s["added"], s["removed"]) == (1, 0, 0)
    assert frames_of(lib, "renamed.mp4") == before  # same labels, same times: nothing decoded
    # a copy takes the known frames (new labels) without decoding
    shutil.copy(moved, d / "copy.mp4")
    s = index(itr, lib, d)
    copied = frames_of(lib, "copy.mp4")
    assert s["added"] == 1 and [t for _, t in copied] == [t for _, t in before]
    assert not {i for i, _ in copied} & {i for i, _ in before}
    # changed: read again, old frames replaced
    clips.write_clip(moved, clips.shape_scenes([(0.0, GREEN), (2.0, RED)]), 4, gop_s=1)
    s = index(itr, lib, d)
    assert s["updated"] == 1
    after = frames_of(lib, "renamed.mp4")
    assert [round(t, 2) for _, t in after] == [0.0, 2.0]
    assert not {i for i, _ in after} & {i for i, _ in before}
    check_ok(itr, lib)
    # pruned: every frame goes, from the rows, the vectors and the graph
    moved.unlink()
    (d / "copy.mp4").unlink()
    s = index(itr, lib, d)
    assert s["removed"] == 2
    info = itr("info", "--db", lib, "--json").json()
    assert (info["videos"], info["frames"], info["vectors"]) == (0, 0, 3)
    rep = check_ok(itr, lib)
    assert rep["graph"]["labels"] == 3


def test_no_video_skips_videos_and_keeps_indexed_ones(itr, tiny_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    s = index(itr, lib, d, "-m", tiny_clip, "--no-video")
    assert (s["scanned"], s["added"]) == (3, 3)
    index(itr, lib, d)
    s = index(itr, lib, d, "--no-video")
    assert (s["removed"], s["scanned"]) == (0, 3)
    assert itr("info", "--db", lib, "--json").json()["videos"] == 1


def test_bad_videos_are_skipped_with_one_line_and_exit_0(itr, tiny_clip, media, tmp_path, monkeypatch):
    d, photos, clip = media
    bad = tmp_path / "media" / "bad"
    bad.mkdir()
    (bad / "empty.mov").write_bytes(b"")
    clips.write_audio_only(bad / "voice.m4v")
    (bad / "text.avi").write_text("hello\n")
    data = clip.read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov is at the end
    g = shots_clip(bad / "garbled.webm", "vp9", gop_s=1.0)
    raw = bytearray(g.read_bytes())
    rng = np.random.default_rng(0)
    mid = len(raw) // 2
    raw[mid:mid + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    g.write_bytes(bytes(raw))
    lib = tmp_path / "lib"
    r = itr("index", d, "--db", lib, "-m", tiny_clip)
    assert r.code == 0, r
    reasons = {ln.split(":")[0].rsplit("/", 1)[-1]: ln for ln in r.err.splitlines()
               if ln.startswith("skipped ")}
    assert set(reasons) == {"empty.mov", "voice.m4v", "text.avi", "truncated.mp4"}, r.err
    assert "empty file" in reasons["empty.mov"]
    assert "audio only" in reasons["voice.m4v"]
    assert "moov atom" in reasons["truncated.mp4"]
    # the garbled clip keeps the frames that decode
    assert len(frames_of(lib, "garbled.webm")) >= 2
    # remembered: not read again until they change
    import itrcli.jobs.indexer as indexer

    calls = []
    monkeypatch.setattr(indexer, "read_video", lambda *a, **k: calls.append(a) or None)
    s = index(itr, lib, d)
    assert (s["skipped"], s["added"], calls) == (4, 0, [])


def test_creation_time_is_the_date_for_after_and_before(itr, micro_clip, media, tmp_path):
    d, photos, clip = media
    clips.write_clip(d / "old.mov", clips.shape_scenes([(0.0, RED)]), 1,
                     creation_time="2019-07-04T18:30:00.000000Z")
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    r = itr("search", "a red circle", "--db", lib, "--before", "2020-01-01", "--json")
    res = r.json()["results"]
    assert [(x["path"], x["taken_at"], x["time"]) for x in res] == [
        (str(d / "old.mov"), "2019-07-04T18:30:00", 0.0)]
    r = itr("search", "a red circle", "--db", lib, "--after", "2020-01-01", "--json", "--frames")
    assert str(d / "old.mov") not in {x["path"] for x in r.json()["results"]}
    assert str(clip) in {x["path"] for x in r.json()["results"]}


def test_check_finds_and_repairs_frame_damage(itr, tiny_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", tiny_clip)
    label = frames_of(lib, "shots.mp4")[1][0]
    c = sqlite3.connect(lib / "itr.db")
    c.execute("DELETE FROM vectors WHERE id = ?", (label,))
    c.commit()
    c.close()
    r = itr("check", "--db", lib, "--json")
    kinds = {p["kind"] for p in r.json()["problems"]}
    assert r.code == 1 and "rows-without-vectors" in kinds, r
    assert any(ex.startswith(str(clip) + " @3") for p in r.json()["problems"] for ex in p["examples"])
    r = itr("check", "--db", lib, "--repair", "--json")
    assert r.code == 0 and r.json()["ok"], r
    assert frames_of(lib, "shots.mp4") == []
    s = index(itr, lib, d)  # read again
    assert s["added"] == 1 and len(frames_of(lib, "shots.mp4")) == 4
    check_ok(itr, lib)


def test_hash_codes_and_dupes_take_a_video_as_the_mean_of_its_frames(itr, micro_clip, media,
                                                                       tmp_path):
    from itrcli import Library
    from itrcli.query import binary

    d, photos, clip = media
    copy = d / "shots-copy.mp4"
    shutil.copy(clip, copy)
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    r = itr("hash", d, "--db", lib)
    assert r.code == 0, r
    got = {p: c for c, p in (ln.split("  ") for ln in r.out.splitlines())}
    assert sorted(got) == sorted(map(str, [*photos, clip, copy]))
    with Library.open(lib, readonly=True) as L:
        lc = binary.library_codes(L.store)
        fid = L.store.row_by_path(str(clip))["id"]
        _, vecs = L.store.vectors(L.store.frames(fid)[0])  # [4, dim]
        mean = vecs.mean(axis=0) / np.linalg.norm(vecs.mean(axis=0))
        assert got[str(clip)] == got[str(copy)] == binary.to_hex(lc.hasher.codes(mean)[0], 64)
        # every label is coded and saved, frames included (keyed by their video's content)
        assert L.store.codes.uncoded_ids("itq-64") == []
        ids, _ = L.store.codes.load_codes("itq-64", 1, valid_only=True)
        assert len(ids) == 3 + 8
        fit = L.store.codes.read_hasher("itq-64").seq_fit
    assert itr("hash", d, "--db", lib).out == r.out  # from the saved codes
    # search --hash over the saved codes finds the frame
    res = itr("search", photos[1], "--db", lib, "--hash", "--json", "-n", "1").json()["results"]
    assert res[0]["path"] in (str(clip), str(copy)) and res[0]["time"] == 3.0, res
    # a new clip is coded without a refit (1 frame of 11 vectors: under 20%)
    clips.write_clip(d / "one.mp4", clips.shape_scenes([(0.0, YELLOW)]), 1)
    r = itr("hash", d, "--db", lib, "--json")
    assert r.code == 0, r
    assert {x["path"] for x in r.json()} == {str(p) for p in [*photos, clip, copy, d / "one.mp4"]}
    with Library.open(lib, readonly=True) as L:
        assert L.store.codes.uncoded_ids("itq-64") == []
        assert L.store.codes.read_hasher("itq-64").seq_fit == fit
    # --dupes: the copied clip (one group), no crash on videos
    r = itr("hash", "--dupes", d, "--db", lib, "--json")
    assert r.code == 0, r
    assert r.json() == [sorted([str(clip), str(copy)])]
    assert "1 (2 of 6 files)" in r.err


def test_ocr_reads_images_only_a_video_is_never_queued_or_counted(itr, micro_clip, media,
                                                                    tmp_path, monkeypatch):
    pytest.importorskip("rapidocr", reason="rapidocr not installed (pip install 'itr-search[ocr]')")
    import itrcli.jobs.textread as textread
    from itrcli.store.db import Store

    d, photos, clip = media
    read, real = [], textread.read_for_text
    monkeypatch.setattr(textread, "read_for_text", lambda p, *a, **k: read.append(p) or real(p, *a, **k))
    lib = tmp_path / "lib"
    s = index(itr, lib, d, "-m", micro_clip, "--ocr")
    assert (s["ocr"]["read"], s["ocr"]["failed"]) == (3, 0)
    assert check_ok(itr, lib)["problems"] == []  # no "text of 1 image(s) is not read yet"
    s = index(itr, lib, d)  # the next run does not read the video either
    assert (s["ocr"]["read"], s["ocr"]["failed"]) == (0, 0), s["ocr"]
    assert str(clip) not in read and len(read) == 3
    # a video's failed read left by an earlier version is dropped, never retried
    store = Store(lib)
    with store.transaction():
        store.words.put(store.row_by_path(str(clip))["hash"], [], reader="old", seconds=0.1,
                        now="2024-01-01T00:00:00", error="not an image (unknown format)")
    store.close()
    s = index(itr, lib, d)
    assert (s["ocr"]["read"], s["ocr"]["failed"], s["ocr"]["removed"]) == (0, 0, 1), s["ocr"]
    assert str(clip) not in read
    info = itr("info", "--db", lib, "--json").json()["ocr"]
    assert (info["images_read"], info["failed"]) == (3, 0)


def test_frames_on_the_fused_text_path(itr, micro_clip, media, tmp_path):
    pytest.importorskip("rapidocr", reason="rapidocr not installed (pip install 'itr-search[ocr]')")
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip, "--ocr")
    args = ("search", "a red circle", "--db", lib, "--json", "-n", "10", "--exact")
    res = itr(*args, "--frames").json()["results"]
    assert all("text" in x for x in res)  # cosine fused with the text match
    assert sorted(x["time"] for x in res if x["path"] == str(clip)) == [0.0, 3.0, 7.0, 12.0]
    assert len(res) == 7
    res = itr(*args).json()["results"]
    assert len(res) == 4 and sum(x["path"] == str(clip) for x in res) == 1


@pytest.fixture
def reds(tmp_path):
    """18 photos of blue, green and yellow shapes, and a clip: a red circle on the left
    (0 s), on the right (2 s), then a blue square (4 s)."""
    d = tmp_path / "reds"
    write_shapes(d, [(c, s, p, i) for i, (c, s, p) in enumerate(
        (c, s, p) for c in ("blue", "green", "yellow") for s in ("square", "triangle", "star")
        for p in ("top", "bottom"))])
    clip = clips.write_clip(d / "reds.mp4", clips.shape_scenes(
        [(0.0, ("red", "circle", "left")), (2.0, ("red", "circle", "right")),
         (4.0, ("blue", "square", "top"))]), 6, gop_s=1)
    return d, clip


def test_frames_with_auto_cut(itr, micro_clip, reds, tmp_path):
    from itrcli import Library

    d, clip = reds
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    with Library.open(lib, readonly=True) as L:
        # a floor below most photos: the cut is the drop after the two red circles
        got = L.search("a red circle", top=10, frames=True, auto_cut=-1.0)
        assert [(h.path, h.time) for h in got] == [(str(clip), 0.0), (str(clip), 2.0)]
        got = L.search("a red circle", top=10, auto_cut=-1.0)
        assert [(h.path, h.time) for h in got] == [(str(clip), 0.0)]


def test_auto_cut_sample_holds_the_frames_of_videos(itr, micro_clip, reds, tmp_path):
    from itrcli import Library
    from itrcli.query import autocut
    from itrcli.query.search import query_parts

    d, clip = reds
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    with Library.open(lib, readonly=True) as L:
        labels, vecs = L.store.vectors()  # 18 photos and 3 frames
        assert len(labels) == 21 and L.store.metadata.sample_ids(1000) == labels.tolist()
        q = L.embed_query(query_parts("a red circle"))
        floor = autocut.library_floor(L.store, q)
        assert floor == pytest.approx(autocut.floor_from_scores(vecs @ q), abs=1e-6)


def test_html_links_to_the_time_and_shows_the_frame(itr, micro_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    page = tmp_path / "p.html"
    r = itr("search", photos[1], "--db", lib, "--html", page, "-n", "1")
    assert r.code == 0, r
    html = page.read_text()
    assert "shots.mp4#t=3.0" in html, html[-1500:]
    assert "data:image/jpeg;base64," in html, html[-1500:]
    thumbs = list((lib / "thumbs").rglob("*-t3000-*.jpg"))
    assert len(thumbs) == 1  # cached by content hash and time


def test_frame_thumbnails_and_previews_show_the_frame_at_its_time(tmp_path):
    from support import synth

    from itrcli.show.preview import Previewer
    from itrcli.show.thumbs import Source, ThumbnailCache

    p = shots_clip(tmp_path / "shots.mp4")
    cache = ThumbnailCache(tmp_path / "thumbs")
    import io

    from PIL import Image

    for t, color in [(1.0, synth.COLORS["red"]), (7.5, synth.COLORS["green"])]:
        img = Image.open(io.BytesIO(cache.get(Source(str(p), "ab" * 16, t), (32, 32)))).convert("RGB")
        arr = np.asarray(img).reshape(-1, 3).astype(int)
        # the shape's colour is there: the frame of that shot, not another one
        assert (np.abs(arr - color).sum(axis=1) < 120).sum() > 20, (t, color)
    assert len(list((tmp_path / "thumbs").rglob("*-t1000-32x32.jpg"))) == 1
    seq = Previewer("iterm", rows=4, cache=cache).sequence(Source(str(p), "ab" * 16, 3.0))
    assert seq.startswith("\x1b]1337;File=")


def test_table_has_a_time_column(itr, micro_clip, media, tmp_path, monkeypatch):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", micro_clip)
    import itrcli.show.output as output

    monkeypatch.setattr(output, "is_tty", lambda stream: True)  # the table, as on a terminal
    r = itr("search", photos[1], "--db", lib, "-n", "2", "--frames")
    first = r.out.splitlines()[0].split()
    assert first[3] == "0:03.0" and first[4] == str(clip), r.out


def test_a_library_from_before_videos_is_read_then_migrated(itr, tiny_clip, media, tmp_path):
    d, photos, clip = media
    lib = tmp_path / "lib"
    index(itr, lib, d, "-m", tiny_clip, "--no-video")
    c = sqlite3.connect(lib / "itr.db")  # back to the 0.1.0 schema
    c.executescript("""
        DROP TABLE frames; DROP INDEX files_videos; ALTER TABLE files DROP COLUMN duration;
        CREATE TABLE v0 (id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
                         vector BLOB NOT NULL);
        INSERT INTO v0 SELECT * FROM vectors; DROP TABLE vectors; ALTER TABLE v0 RENAME TO vectors;
        DELETE FROM migrations WHERE name = 'm005_video_frames';
        UPDATE meta SET value = '2' WHERE key = 'schema_version';
    """)
    c.close()
    assert itr("search", "a red circle", "--db", lib, "--json").json()["results"][0]["time"] is None
    assert itr("info", "--db", lib, "--json").json()["videos"] == 0
    check_ok(itr, lib)
    s = index(itr, lib, d)
    assert s["added"] == 1 and len(frames_of(lib, "shots.mp4")) == 4
    check_ok(itr, lib)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    import faults

    z = faults.Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@posix_only("kills a process with SIGKILL, which Windows does not have")
@pytest.mark.parametrize("point", ["commit:2", "graph-tmp:1"])
def test_kill9_mid_run_then_resume(zygote, itr, tiny_clip, tmp_path, point):
    import signal

    d = tmp_path / "clips"
    d.mkdir()
    shapes = [RED, BLUE, GREEN, YELLOW]
    for i in range(5):  # 5 clips of 3 shots each: one batch (of 4 frames) per clip
        scenes = [(0.0, shapes[i % 4]), (1.0, shapes[(i + 1) % 4]), (2.0, shapes[(i + 2) % 4])]
        clips.write_clip(d / f"c{i}.mp4", clips.shape_scenes(scenes), 3, gop_s=1)
    db = tmp_path / "lib"
    batch = ["--batch-size", "3", "--precision", "fp32", "--workers", "2"]
    index(itr, db, d / "c0.mp4", "-m", tiny_clip)
    c = zygote.run("index", d, "--db", db, *batch, faults=f"kill={point}")
    assert c.code == -signal.SIGKILL, c
    check_ok(itr, db)  # whole clips or none; the graph catches up from the log
    c = zygote.run("index", d, "--db", db, "--json", "-q", *batch)
    assert c.code == 0, c
    assert all(len(frames_of(db, f"c{i}.mp4")) == 3 for i in range(5))
    rep = check_ok(itr, db)
    assert rep["graph"]["labels"] == 15 and rep["graph"]["log_entries"] == 0
