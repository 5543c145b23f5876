"""The suite's own isolation (tests/conftest.py): fixtures made once per module or session
run before a test's isolation, and must not see the real home or caches either (they index
libraries, which export their text tower into the machine's tower cache: every run of the
suite used to leave entries in the real ~/.cache/itr)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NAMES = ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "HF_HOME", "HF_HUB_CACHE")


@pytest.fixture(scope="module")
def module_env():
    from itrcli.embed import towercache

    env = {k: os.environ.get(k) for k in NAMES + ("ITR_TOWER_CACHE",)}
    env["tower cache"] = str(towercache.root())
    return env


def test_module_fixtures_see_no_real_home_or_cache(module_env, tmp_path_factory):
    base = Path(tmp_path_factory.getbasetemp()).resolve()
    for name in NAMES + ("tower cache",):
        assert module_env[name] and Path(module_env[name]).resolve().is_relative_to(base), name
    assert module_env["ITR_TOWER_CACHE"] is None
