#!/usr/bin/env bash
# Rebuild tests/fixtures/library-0.1.0: a small library written by itr 0.1.0 itself (the
# commit that released it), so that tests can check that every later version opens and
# searches it as before and migrates it on first write.
#
#     bash scripts/make_legacy_fixture.sh
#
# The photos are the micro model's drawings (tests/support/synth.py), kept beside the
# library with their mtimes in photos.json; the library records their paths under ROOT,
# which the tests rewrite to wherever they copy the fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=78dc3bd45a36604afbe617fe9f4635f86e59b679  # "README: the ef measurement ..." = 0.1.0
ROOT=/tmp/itr-legacy-fixture
OUT=tests/fixtures/library-0.1.0
rm -rf "$ROOT" "$OUT"
git worktree add --detach "$ROOT/src" "$REV" >/dev/null
trap 'git worktree remove --force "$ROOT/src"' EXIT
mkdir -p "$ROOT/photos"
PYTHONPATH="$PWD/tests" python3 - "$ROOT/photos" <<'PY'
import sys
from pathlib import Path
from support import synth
d = Path(sys.argv[1])
for i, (colour, shape, pos) in enumerate([("red", "circle", "left"), ("blue", "square", "right"),
        ("green", "triangle", "left"), ("red", "square", "right"), ("blue", "circle", "left"),
        ("green", "circle", "right")]):
    synth.draw(colour, shape, pos, size=64).save(d / f"{i}-{colour}-{shape}.png")
(d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
PY
export HF_HUB_OFFLINE=1
# -s: nothing from this checkout leaks into the old code's imports
itr010() { (cd "$ROOT/src" && PYTHONPATH="$ROOT/src" python3 -s -m itrcli "$@"); }
itr010 index "$ROOT/photos" --db "$ROOT/lib" -m "$PWD/tests/fixtures/micro-clip" --precision fp32 -q
itr010 hash --bits 64 "$ROOT/photos" --db "$ROOT/lib" >/dev/null
itr010 search "a red circle" --db "$ROOT/lib" --json -n 6 > "$ROOT/lib/expected-search.json"
mkdir -p "$OUT"
cp -r "$ROOT/lib" "$OUT/lib"
cp -r "$ROOT/photos" "$OUT/photos"
python3 - "$ROOT" "$OUT" <<'PY'
import json, os, sys
from pathlib import Path
root, out = sys.argv[1], Path(sys.argv[2])
photos = {p.name: os.stat(p).st_mtime_ns for p in sorted(Path(root, "photos").iterdir())}
(out / "photos.json").write_text(json.dumps({"root": root, "mtime_ns": photos}, indent=1) + "\n")
PY
rm -rf "$OUT/lib/thumbs" "$OUT/lib/lock"
echo "wrote $OUT"
