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
    from itrcli.embed.models import NO_PUBLISHED_R1

    for p in j.values():  # a figure, or the note that no published one was found
        assert (p["flickr30k_t2i_r1"] is not None or p["coco_t2i_r1"] is not None
                or NO_PUBLISHED_R1 in p["note"]), p
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


# --- control characters in names: escaped on a terminal, exact when piped ----------------

EVIL = "evil\x1b]0;owned\x07\x1b[2J\x9b31m.jpg"  # retitles, clears, recolours (C1 CSI)
EVIL_SHOWN = "evil\\033]0;owned\\a\\033[2J\\302\\23331m.jpg"
EVIL_DIR = "ph\x1b[31motos\nx"
EVIL_DIR_SHOWN = "ph\\033[31motos\\nx"


def _no_controls(text: str) -> bool:
    return not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) <= 0x9f for c in text)


def test_one_line_escapes_controls_as_ls_does():
    from itrcli.show.output import one_line

    assert one_line(EVIL) == EVIL_SHOWN
    assert one_line("a\nb\tc\rd\x00e\x7ff\x01") == "a\\nb\\tc\\rd\\000e\\177f\\001"
    assert one_line("not utf-8 \udcff") == "not utf-8 \\377"  # the byte the name holds
    assert one_line("\u202eexe.jpg") == "\\342\\200\\256exe.jpg"  # a bidi override
    for fine in ("plain/path é 写.jpg", "back\\slash", "tab-less"):
        assert one_line(fine) == fine


@pytest.fixture
def evil_lib(itr, tiny_clip, tmp_path):
    from conftest import write_shapes

    d = tmp_path / EVIL_DIR
    paths = write_shapes(d, [("red", "circle", "left", 1), ("blue", "square", "right", 2)])
    paths[0].rename(d / EVIL)
    (d / ("bad\x1b[5m.png")).write_bytes(b"")  # skipped: the reason line names it
    r = itr("index", d, "--db", tmp_path / "lib", "-m", tiny_clip)
    assert r.code == 0, r
    return tmp_path / "lib", d, r.err


def test_a_terminal_never_gets_control_characters_of_a_name(itr, evil_lib, monkeypatch):
    from itrcli.show import output

    db, d, index_err = evil_lib
    monkeypatch.setattr(output, "is_tty", lambda stream: True)
    r = itr("search", "a red circle", "--db", db)
    assert r.code == 0 and _no_controls(r.out), r.out
    assert EVIL_DIR_SHOWN + "/" + EVIL_SHOWN in r.out
    r = itr("info", "--db", db)
    assert _no_controls(r.out) and f"roots:     {d}".replace("\x1b", "\\033").replace("\n", "\\n") in r.out
    r = itr("hash", d, "--db", db, "-q")
    assert r.code == 0 and _no_controls(r.out) and EVIL_SHOWN in r.out, r
    # --json and -0 stay exact on a terminal too
    hits = itr("search", "a red circle", "--db", db, "--json").json()["results"]
    assert str(d / EVIL) in [h["path"] for h in hits]
    assert str(d / EVIL) + "\0" in itr("search", "a red circle", "--db", db, "-0").out
    (d / EVIL).unlink()
    r = itr("search", str(d / "gone\x1b[2J.jpg"), "--image", str(d / "gone\x1b[2J.jpg"),
            "--db", db)  # an error naming a file
    assert r.code != 0 and "gone\\033[2J.jpg" in r.err and _no_controls(r.err), r
    r = itr("check", "--db", db)  # the vanished file's example line
    assert EVIL_SHOWN in r.err and _no_controls(r.err), r.err
    # stderr's lines (a skipped file's reason here) are always escaped: one line each
    assert f"skipped {d}/bad\x1b[5m.png".replace("\x1b", "\\033").replace("\n", "\\n") in index_err
    assert _no_controls(index_err), index_err


def test_piped_output_keeps_names_byte_exact(itr, evil_lib):
    db, d, _ = evil_lib
    r = itr("search", "a red circle", "--db", db)
    assert f"\t{d / EVIL}\n" in r.out
    assert itr("search", "a red circle", "--db", db, "--paths").out.count(str(d / EVIL)) == 1
    assert f"roots:     {d}\n" in itr("info", "--db", db).out
    assert f"  {d / EVIL}\n" in itr("hash", d, "--db", db, "-q").out


def test_text_read_in_an_image_is_escaped_on_a_terminal(itr, tmp_path, monkeypatch):
    """`itr text`: the words (and the header naming the file) carry no control character to
    a terminal; piped they are the text as read."""
    import itrcli.jobs.textread as textread
    from itrcli.show import output

    for n in ("a.jpg", EVIL):
        (tmp_path / n).write_bytes(b"x")
    monkeypatch.setattr(textread, "text_for", lambda f, store, reader: {
        "path": f, "source": "read", "lines": [{"text": "PAY\x1b[8mHIDDEN", "box": [], "confidence": 1.0}]})
    args = ("text", tmp_path / "a.jpg", tmp_path / EVIL, "--db", tmp_path / "none")
    r = itr(*args)
    assert r.code == 0 and f"==> {tmp_path / EVIL} <==\nPAY\x1b[8mHIDDEN\n" in r.out, r
    monkeypatch.setattr(output, "is_tty", lambda stream: True)
    r = itr(*args)
    assert r.code == 0 and _no_controls(r.out), r
    assert f"==> {tmp_path}/{EVIL_SHOWN} <==\nPAY\\033[8mHIDDEN\n" in r.out


def test_the_words_column_is_escaped():
    from itrcli.show.results import words_cell

    assert words_cell(["ACME", "in\x1b[2Jvoice"]) == "ACME in\\033[2Jvoice"
