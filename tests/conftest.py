"""Shared fixtures: isolated environment, locally built models, an in-process `itr`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MICRO_CLIP = FIXTURES / "micro-clip"
LEGACY = FIXTURES / "library-0.1.0"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the long fault-injection loops")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long loop: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The same for module- and session-scoped fixtures, which are made before a test's own
    isolation (below): a library they index would export its text tower into the real
    ~/.cache/itr (it did, on every run of the suite)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(tmp_path_factory.mktemp("session-env"), mp)
        yield


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test touches the real home, cache or network, nor reads the user's itr options."""
    _isolate(tmp_path, monkeypatch)


def _isolate(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # the Hugging Face cache too (~/.cache/huggingface, or wherever HF_HOME points)
    hub = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    for var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    hf = sys.modules.get("huggingface_hub.constants")
    if hf is not None:  # imported by an earlier test: it read the environment then
        monkeypatch.setattr(hf, "HF_HOME", str(hub.parent))
        monkeypatch.setattr(hf, "HF_HUB_CACHE", str(hub))
    for var in ("ITR_DB", "ITR_MODEL", "ITR_RERANK_MODEL", "ITR_RERANK_CACHE_BYTES",
                "ITR_THUMB_CACHE_MIB", "ITR_IMAGE_RUNTIME", "ITR_TOWER_CACHE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from support import synth

    return synth.make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> Path:
    from support import synth

    return synth.make_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="session")
def micro_clip() -> Path:
    if not (MICRO_CLIP / "model.safetensors").exists():
        pytest.skip("tests/fixtures/micro-clip missing: run scripts/train_micro_clip.py")
    return MICRO_CLIP


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[-500:]!r}, err={self.err[-1500:]!r})"


def run_itr(*args: str | os.PathLike) -> Result:
    """Run the CLI in this process (torch stays imported between calls: fast tests)."""
    from itrcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def itr():
    return run_itr


def write_shapes(directory: Path, specs, size: int = 64, fmt: str = "jpg") -> list[Path]:
    """Draw (color, shape, position, seed) images into ``directory``; returns their paths."""
    from support import synth

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for color, shape, pos, seed in specs:
        p = directory / f"{color}-{shape}-{pos}-{seed}.{fmt}"
        synth.draw(color, shape, pos, size=size, seed=seed).save(p)
        out.append(p)
    return out


def index_shapes(itr, tmp_path: Path, specs, model) -> tuple[Path, list[Path]]:
    """Draw ``specs`` into ``tmp_path/photos`` and index them into ``tmp_path/lib`` with
    ``model``: (the library, the drawings)."""
    paths = write_shapes(tmp_path / "photos", specs)
    db = tmp_path / "lib"
    r = itr("index", tmp_path / "photos", "--db", db, "-m", model, "-q")
    assert r.code == 0, r
    return db, paths


def copy_legacy_library(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The 0.1.0 fixture library (tests/fixtures/library-0.1.0) copied to ``tmp_path/lib``
    with its photos in ``tmp_path/photos``, the paths it recorded moved there (the photos
    keep the mtimes they had, so they are unchanged files to the library) and bound to the
    micro model: (library, photos, its expected search with the paths moved)."""
    import shutil
    import sqlite3

    lib, photos = tmp_path / "lib", tmp_path / "photos"
    shutil.copytree(LEGACY / "lib", lib)
    shutil.copytree(LEGACY / "photos", photos)
    rec = json.loads((LEGACY / "photos.json").read_text())
    for name, mtime in rec["mtime_ns"].items():
        os.utime(photos / name, ns=(mtime, mtime))
    old = rec["root"] + "/photos"
    c = sqlite3.connect(lib / "itr.db", isolation_level=None)
    try:
        for table in ("files", "failures"):
            c.execute(f"UPDATE {table} SET path = replace(path, ?, ?)", (old, str(photos)))
        c.execute("UPDATE meta SET value = ? WHERE key = 'roots'", (json.dumps([str(photos)]),))
        c.execute("UPDATE meta SET value = ? WHERE key = 'model'", (json.dumps(str(MICRO_CLIP)),))
    finally:
        c.close()
    # its exported text tower names the model it belongs to: the same one, moved too
    settings = lib / "text" / "settings.json"
    if settings.exists():
        s = json.loads(settings.read_text())
        s["model"] = str(MICRO_CLIP)
        settings.write_text(json.dumps(s, indent=1))
    expected = json.loads((lib / "expected-search.json").read_text())
    for hit in expected["results"]:
        hit["path"] = hit["path"].replace(old, str(photos))
    return lib, photos, expected


def main_in_fresh_python(args: list[str], modules: tuple[str, ...], timeout: float = 120):
    """``main(args)`` run in a new interpreter; its stderr ends with ``HEAVY [...]``, those
    of ``modules`` that were imported (the completed process)."""
    import subprocess

    code = ("import sys; from itrcli.cli import main\n"
            f"try: main({[str(a) for a in args]!r})\n"
            "except SystemExit: pass\n"
            f"heavy = [m for m in {modules!r} if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "itrcli"]


def posix_only(why: str):
    """A test that can only fail on POSIX systems (Linux, macOS): skipped on Windows, with
    the reason (the workflow in .github/workflows runs the suite there too)."""
    return pytest.mark.skipif(os.name == "nt", reason=f"POSIX only: {why}")


def find_chromium() -> str | None:
    """A Chromium to drive: ``$ITR_CHROMIUM`` (e.g. Playwright's own, on a runner that has
    no Debian package), else ``chromium`` or ``chromium-browser`` on PATH."""
    import shutil

    env = os.environ.get("ITR_CHROMIUM")
    if env and os.path.exists(env):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def find_firefox() -> str | None:
    """A Firefox to drive over WebDriver BiDi (tests/support/bidi.py): ``$ITR_FIREFOX``,
    else ``firefox-esr`` (Debian's package) or ``firefox`` on PATH."""
    import shutil

    env = os.environ.get("ITR_FIREFOX")
    if env and os.path.exists(env):
        return env
    for name in ("firefox-esr", "firefox"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def page_tests_required() -> bool:
    """Whether a missing browser fails the page tests instead of skipping them: in CI
    (``CI=true``, which .ci/run installs Chromium and Firefox for), unless
    ``ITR_PAGE_TESTS=skip`` (the workflow's macOS and Windows runners)."""
    return (os.environ.get("CI", "").lower() == "true"
            and os.environ.get("ITR_PAGE_TESTS", "").lower() != "skip")


def missing_browser(why: str):
    """A page test without its browser (or driver): fails under :func:`page_tests_required`,
    else skips with ``why``."""
    if page_tests_required():
        pytest.fail(f"{why} (CI=true: the page tests must run)")
    pytest.skip(why)


#: a file name that is HTML (the page must show it as text)
HOSTILE_NAME = '<img src=x onerror="window.__xss=1">&amp;"\'.jpg'


@pytest.fixture(scope="module")
def served_page(tmp_path_factory, micro_clip):
    """The page tests' library, served by a real `itr serve` on a free loopback port: 12
    drawings (red, blue, green; circle, square; left, right), one more under
    :data:`HOSTILE_NAME`, and with PyAV a short video (``.video``; else None). The
    :class:`support.serving.Served` has ``.root`` and ``.photos`` too."""
    from support import serving

    root = tmp_path_factory.mktemp("page")
    specs = [(c, s, p, i) for i, (c, s, p) in enumerate(
        [(c, s, p) for c in ("red", "blue", "green") for s in ("circle", "square")
         for p in ("left", "right")])]
    env = {"HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"),
           "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        photos = root / "photos"
        write_shapes(photos, specs)
        [odd] = write_shapes(root / "odd", [("red", "circle", "right", 40)])
        os.rename(odd, photos / HOSTILE_NAME)
        video = None
        try:
            import av  # noqa: F401

            from support import clips

            video = clips.write_clip(photos / "clip.webm", clips.shape_scenes(
                [(0.0, ("green", "square", "left")), (2.0, ("blue", "circle", "right"))]),
                4, fps=5, codec="vp9")
        except ImportError:
            pass
        r = run_itr("index", photos, "--db", root / "lib", "-m", micro_clip, "-q")
        assert r.code == 0, r
    with serving.start(root / "lib", env=env) as s:
        s.root, s.photos, s.video = root, photos, video
        yield s
