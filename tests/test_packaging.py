"""The distribution as a user gets it: `python -m build` makes a wheel and an sdist named
for PyPI (itr-search), and the wheel, installed into a fresh virtual environment, indexes
and searches photos with the micro CLIP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import MICRO_CLIP, write_shapes

ROOT = Path(__file__).resolve().parents[1]
NAME = "itr-search"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the build package is not installed (pip install build)")
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "itr"
    # a copy of the tracked tree: the build writes its egg-info beside the sources
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_the_wheel_and_sdist_carry_the_pypi_name_the_licence_and_the_page(dist):
    (whl,) = dist.glob("itr_search-*-py3-none-any.whl")
    (sdist,) = dist.glob("itr_search-*.tar.gz")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert f"Name: {NAME}" in meta and "License-Expression: MIT" in meta
    assert "Operating System :: Microsoft :: Windows" in meta and "Project-URL:" in meta
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "itr = itrcli.cli:main" in entry
    assert "itrcli/serve/static/index.html" in names  # the page of itr serve
    assert not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdist) as t:
        members = t.getnames()
    assert any(m.endswith("/LICENSE") for m in members)
    assert any(m.endswith("/itrcli/cli.py") for m in members)


def test_the_wheel_installs_into_a_fresh_venv_and_indexes_and_searches(dist, tmp_path):
    if not (MICRO_CLIP / "model.safetensors").exists():
        pytest.skip("tests/fixtures/micro-clip missing")
    (whl,) = dist.glob("itr_search-*.whl")
    env_dir = tmp_path / "venv"
    # the heavy dependencies (torch, transformers...) come from this interpreter's site;
    # itr itself only from the wheel
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / ("python.exe" if os.name == "nt" else "python")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "-q", str(whl)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import itrcli; print(itrcli.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert where.returncode == 0 and str(env_dir) in where.stdout, where  # not this checkout
    itr = str(bindir / ("itr.exe" if os.name == "nt" else "itr"))
    write_shapes(tmp_path / "photos", [("red", "circle", "left", 1), ("blue", "square", "right", 2),
                                       ("green", "triangle", "top", 3)])
    lib = tmp_path / "lib"
    r = subprocess.run([itr, "index", str(tmp_path / "photos"), "--db", str(lib), "-m",
                        str(MICRO_CLIP), "--json", "-q"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and json.loads(r.stdout)["added"] == 3, r.stderr[-2000:]
    r = subprocess.run([itr, "search", "a red circle", "--db", str(lib), "--json", "-n", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["results"][0]["path"].endswith("red-circle-left-1.jpg")
    r = subprocess.run([itr, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip(), r
