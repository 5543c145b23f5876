"""Precision and recall of the set `itr search --auto-cut` keeps, per number of sigmas.

The evaluation set is the synthetic shapes set of ``itr eval`` (``tests/support/synth.py``
drawings, seeds the test model never saw): every caption ("a red circle on the left") drawn
``--per`` times, so that each query has several relevant images.  Queries:

- ``caption``: the 150 full captions; relevant = the drawings of that caption;
- ``color+shape``: "a red circle" (30 queries); relevant = that colour and shape anywhere;
- ``absent``: the 25 purple captions against the set less its purple drawings (750
  images): nothing is relevant, so a good cut-off keeps nothing (``empty`` counts those).

Each query is scored against every image, the cut-off is computed exactly as ``--auto-cut``
does (:func:`itrcli.query.autocut.cut_from_scores` over the library's fixed sample, which
is the whole set below 1,000 images), and the kept set is compared with the relevant set.
Rows: ``auto-cut Z`` (floor at Z standard deviations, then the largest drop among the best
50 above it; ``--auto-cut`` uses the default), for comparison the largest drop alone, the
floor alone (keep everything above it), and the one fixed ``--threshold`` that is best in
hindsight for the caption queries.

    python bench/autocut.py [--model tests/fixtures/micro-clip] [--per 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prf(kept, relevant) -> tuple[float, float, float]:
    tp = len(kept & relevant)
    p = tp / len(kept) if kept else (1.0 if not relevant else 0.0)
    r = tp / len(relevant) if relevant else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def main() -> None:
    import numpy as np

    from itrcli.embed.encoder import Encoder
    from itrcli.query.autocut import FLOOR_SIGMAS, SAMPLE_SIZE, floor_from_scores, gap_cut
    from support import synth

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/micro-clip"))
    ap.add_argument("--per", type=int, default=6, help="drawings of each caption")
    a = ap.parse_args()

    enc = Encoder(a.model, device="cpu", precision="fp32")
    labels, pix = [], []
    for n, (c, s, p) in enumerate(synth.combinations()):
        for j in range(a.per):
            img = synth.draw(c, s, p, size=64, seed=1_000_000 + n * a.per + j)
            pix.append(enc.prep(img))
            labels.append((c, s, p))
    vecs = np.concatenate([enc.encode_pixels(np.stack(pix[i:i + 256]))
                           for i in range(0, len(pix), 256)])  # [n, dim]
    rng = np.random.default_rng(0)
    sample = vecs if len(vecs) <= SAMPLE_SIZE else vecs[rng.choice(len(vecs), SAMPLE_SIZE, replace=False)]

    sets = {
        "caption": [(synth.caption(c, s, p), {i for i, l in enumerate(labels) if l == (c, s, p)})
                    for c, s, p in synth.combinations()],
        "color+shape": [(f"a {c} {s}", {i for i, l in enumerate(labels) if l[:2] == (c, s)})
                        for c in synth.COLORS for s in synth.SHAPES],
    }
    # a query with nothing relevant: the purple captions, against the library less purple
    others = np.asarray([i for i, l in enumerate(labels) if l[0] != "purple"])
    sets["absent"] = [(synth.caption(c, s, p), set()) for c, s, p in synth.combinations()
                      if c == "purple"]
    print(f"{len(vecs)} images ({a.per} per caption), model {Path(a.model).name}")
    print(f"{'queries':<12} {'method':<22} {'precision':>9} {'recall':>7} {'F1':>6} {'kept':>6} {'empty':>6}")
    for name, qs in sets.items():
        q = enc.encode_texts([t for t, _ in qs])  # [nq, dim]
        lib = vecs[others] if name == "absent" else vecs
        scores = q @ lib.T  # [nq, n]
        samp = q @ (lib if name == "absent" else sample).T
        desc = -np.sort(-scores, axis=1)  # [nq, n], best first
        methods = {}
        for z in (1.0, 1.5, 2.0, 2.5):
            tag = " (default)" if z == FLOOR_SIGMAS else ""
            methods[f"auto-cut {z:g}{tag}"] = [gap_cut(desc[i], floor_from_scores(samp[i], z))
                                              for i in range(len(qs))]
        methods["largest gap"] = [gap_cut(desc[i], -np.inf) for i in range(len(qs))]
        for z in (2.0, 2.5, 3.0, 4.0):
            methods[f"floor {z:g} alone"] = [floor_from_scores(samp[i], z) for i in range(len(qs))]
        if name == "caption":
            best = max(np.arange(-0.5, 1.0, 0.01), key=lambda t: np.mean([
                prf(set(np.flatnonzero(scores[i] >= t)), rel)[2] for i, (_, rel) in enumerate(qs)]))
            fixed = float(best)
        methods[f"fixed {fixed:.2f}"] = [fixed] * len(qs)
        for m, cuts in methods.items():
            rows = []
            for i, (_, rel) in enumerate(qs):
                kept = np.flatnonzero(scores[i] >= cuts[i])
                if not m.startswith(("fixed", "floor")):  # as in search: the best 50 at most
                    kept = kept[np.argsort(-scores[i][kept], kind="stable")][:50]
                rows.append(prf(set(kept.tolist()), rel) + (len(kept),))
            p, r, f, k = (float(np.mean([x[j] for x in rows])) for j in range(4))
            empty = sum(x[3] == 0 for x in rows)
            print(f"{name:<12} {m:<22} {p:>9.3f} {r:>7.3f} {f:>6.3f} {k:>6.1f} {empty:>6}")


if __name__ == "__main__":
    main()
