"""What `itr adapt` costs and gains.

1. Fitting time: the whole of what `itr adapt` does after embedding (5-fold cross-validated
   choice among every candidate, then the final fit) for 1,000 and 10,000 pairs of 512-d
   vectors (laion-b32's dimension), one caption per image, wall-clock and CPU seconds.
   The vectors are synthetic (images random on the sphere; captions a random rotation of
   their image plus noise), so the time is what it would be on real ones of that size.
2. The gain per method on the domain-shift set of the tests (tests/support/shift.py: the
   micro CLIP's drawings captioned in words it never saw): fitted on half a (75 pairs),
   text->image and image->text recall on half b (75 images), exactly as
   `itr eval b.csv --adapt a.csv` computes it, one method at a time.

    python bench/adapt.py [--sizes 1000,10000] [--no-shift]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def synthetic_pairs(n: int, dim: int = 512, seed: int = 0):
    """Image vectors random on the sphere; each caption a random rotation of its image
    plus a little of the image itself and noise, so the model as it is ranks poorly
    and a map can learn the rotation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # [dim, dim] orthogonal
    t = 0.1 * x + x @ q + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    t = (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)
    return t, x


def fit_times(sizes: list[int]) -> None:
    import numpy as np

    from itrcli.query import adapt

    print(f"{'pairs':>7}  {'methods':<10}  {'wall s':>7}  {'CPU s':>7}  picked (held-out R@1: "
          "none -> picked)")
    for n in sizes:
        t, x = synthetic_pairs(n)
        img = np.arange(n)
        for methods in (list(adapt.METHODS), ["ridge"], ["procrustes"], ["cca"]):
            t0, c0 = time.perf_counter(), time.process_time()
            _, sel = adapt.select_and_fit(t, x, img, methods=methods)
            s, c = time.perf_counter() - t0, time.process_time() - c0
            name = "all" if len(methods) > 1 else methods[0]
            print(f"{n:>7}  {name:<10}  {s:>7.2f}  {c:>7.2f}  {sel.best.label()} "
                  f"({sel.baseline['R@1']:.1f} -> {sel.recall_of(sel.best)['R@1']:.1f})",
                  flush=True)


def shift_gain() -> None:
    from support import shift

    from itrcli.evaluation import datasets, evaluate
    from itrcli.query import adapt

    model = str(ROOT / "tests" / "fixtures" / "micro-clip")
    with tempfile.TemporaryDirectory() as d:
        shift.write_shift_set(Path(d), seed=0)
        b = datasets.load(Path(d) / "b.csv")
        a = datasets.load(Path(d) / "a.csv")
        cache = Path(d) / "cache.db"
        print(f"{'method':<12}{'picked':<18}{'t2i R@1':>8}{'R@5':>7}{'R@10':>7}"
              f"{'i2t R@1':>9}{'R@5':>7}{'R@10':>7}")
        for methods in (list(adapt.METHODS), ["ridge"], ["procrustes"], ["cca"]):
            r = evaluate.evaluate(b, [model], adapt=a, adapt_methods=methods, cache=cache,
                                  precision="fp32")
            rows = {x.method: x for x in r.results}
            picks = r.adapt["models"][model]
            if methods == list(adapt.METHODS):
                _row("none", "-", rows["exact"])
            _row("all" if len(methods) > 1 else methods[0], picks[0]["picked"], rows["exact+adapt"])


def _row(name, picked, m) -> None:
    t, i = m.t2i, m.i2t
    print(f"{name:<12}{picked:<18}{t['R@1']:>8.1f}{t['R@5']:>7.1f}{t['R@10']:>7.1f}"
          f"{i['R@1']:>9.1f}{i['R@5']:>7.1f}{i['R@10']:>7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--no-shift", action="store_true")
    a = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    fit_times([int(s) for s in a.sizes.split(",") if s])
    if not a.no_shift:
        print()
        shift_gain()


if __name__ == "__main__":
    main()
