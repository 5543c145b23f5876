"""The workflow that runs the suite on Linux, macOS and Windows (.github/workflows/ci.yml)
cannot run here: at least it parses, covers the platforms and Pythons it promises, and
every file its steps name exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def flow() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_matrix_covers_three_systems_and_three_pythons(flow):
    on = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in on and "pull_request" in on
    m = flow["jobs"]["test"]["strategy"]["matrix"]
    assert set(m["os"]) == {"ubuntu-latest", "macos-latest", "windows-latest"}
    assert m["python"] == ["3.11", "3.12", "3.13"]
    assert flow["jobs"]["test"]["strategy"]["fail-fast"] is False
    assert any("python -m build" in s.get("run", "") for s in flow["jobs"]["wheel"]["steps"])


def test_every_step_is_well_formed_and_names_files_that_exist(flow):
    for name, job in flow["jobs"].items():
        assert job["runs-on"], name
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step  # one or the other
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
                continue
            for path in re.findall(r"(?:scripts|\.ci|tests|bench)/[\w./-]+", step["run"]):
                assert (ROOT / path).exists(), f"{name}: {path} does not exist"
            for extra in re.findall(r"\.\[(\w+)\]", step["run"]):
                assert f"\n{extra} = " in (ROOT / "pyproject.toml").read_text(), extra
