"""The command line as a whole: help, examples, docs, exit codes, entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import python_cmd

ROOT = Path(__file__).resolve().parent.parent


def commands():
    import typer

    from itrcli.cli import app

    group = typer.main.get_command(app)
    return group, sorted(group.commands)


def test_every_command_has_help_an_example_and_a_readme_entry():
    group, names = commands()
    readme = (ROOT / "README.md").read_text()
    assert {"index", "search", "info", "models", "path"} <= set(names)
    for name in names:
        cmd = group.commands[name]
        assert cmd.help and cmd.help.strip(), name
        summary = cmd.help.strip().splitlines()[0]
        assert not summary.endswith("."), f"{name}: the summary is a fragment, no full stop"
        assert "Example:" in cmd.help, f"{name} has no Example: block"
        assert f"itr {name}" in readme, f"README does not show `itr {name}`"
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{name} {p.opts} has no help"


def test_version_and_module_entry_point():
    from itrcli import __version__

    r = subprocess.run(python_cmd() + ["--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"itr {__version__}"


def test_usage_errors_exit_2_with_one_message(itr):
    r = itr("search", "--top", "0", "x")
    assert r.code == 2 and "Traceback" not in r.err
    r = itr("nosuchcommand")
    assert r.code == 2
    r = itr("index", "--precision", "fp8", "/nonexistent")
    assert r.code in (1, 2) and "Traceback" not in r.err


def test_unexpected_errors_are_one_line_without_v(itr, monkeypatch, tmp_path):
    import itrcli.library as library

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(library.Library, "info", boom)
    (tmp_path / "lib").mkdir()
    from itrcli.store.db import Store

    Store(tmp_path / "lib", create=True).close()
    r = itr("info", "--db", tmp_path / "lib")
    assert r.code == 1 and "bug" in r.err and "Traceback" not in r.err
    with pytest.raises(ZeroDivisionError):
        from itrcli.cli import main

        main(["info", "--db", str(tmp_path / "lib"), "-v"])


def test_models_lists_presets_and_marks_the_default(itr):
    r = itr("models")
    assert r.code == 0 and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in r.out
    default = [line for line in r.out.splitlines() if line.startswith("*")]
    # the row and the footnote, of the encoders then of the re-rankers
    assert len(default) == 4 and "laion-b32" in default[0] and "blip-itm" in default[2]
    j = itr("models", "--json").json()
    assert sum(p["default"] for p in j if p["kind"] == "encoder") == 1
    assert sum(p["default"] for p in j if p["kind"] == "reranker") == 1


def test_every_preset_has_published_figures_and_the_docs_table_agrees(itr):
    """Each encoder preset carries a published recall (Flickr30k or COCO), SigLIP 2 ones
    their authors' COCO figures; docs/commands.md lists the same numbers."""
    import re

    from itrcli.embed.models import PRESETS

    j = {p["name"]: p for p in itr("models", "--json").json() if p["kind"] == "encoder"}
    assert set(j) == {p.name for p in PRESETS}
    for p in j.values():
        assert p["flickr30k_t2i_r1"] is not None or p["coco_t2i_r1"] is not None, p
    sig2 = [p for n, p in j.items() if n.startswith("siglip2-")]
    assert len(sig2) >= 12 and all(p["coco_t2i_r1"] and p["coco_i2t_r1"] for p in sig2)
    assert (j["siglip2-b16"]["model"], j["siglip2-b16"]["coco_t2i_r1"]) == (
        "google/siglip2-base-patch16-224", 52.1)
    docs = (ROOT / "docs" / "commands.md").read_text().split("## `itr models`")[1].split("\n## ")[0]
    for p in PRESETS:
        row = re.search(rf"^\| `{re.escape(p.name)}`.*$", docs, re.M)
        assert row, p.name
        cells = [c.strip() for c in row.group(0).split("|")]
        coco = f"{p.coco_t2i_r1} / {p.coco_i2t_r1}" if p.coco_t2i_r1 else "-"
        flickr = f"{p.flickr_t2i_r1} / {p.flickr_i2t_r1}" if p.flickr_t2i_r1 else "-"
        assert (cells[2], cells[4], cells[5]) == (f"`{p.hub_id}`", flickr, coco), cells


def test_exit_codes_are_documented():
    from itrcli.errors import ExitCode

    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, f"exit code {int(code)} missing from README"
