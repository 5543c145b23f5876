"""A library of N images on one machine: size on disk, the dense-layout conversion, and
the time and memory of every command that reads the whole library.

Builds (once, kept under OUT) a random-weight model of the real ViT-B/32 architecture, N
empty files under OUT/files-N, and a library OUT/lib-N bound to the model with its
exported text tower, whose rows point at those files and carry N synthetic clustered unit
vectors (as bench/search_latency.py does), with its HNSW graph.  The library is built in
the layout itr 0.1.0 wrote (float32 vectors in 4 KiB pages), so that the same run measures
every command on it, then converts it with `itr check --compact` (timed), then measures
every command again on the dense layout:

- bytes per image: database, graph, text tower, all included;
- cold `itr search` (median of --runs processes, and the peak RSS of the slowest);
- the recall@10 measurement `itr index` runs after building a graph (its time, ef, recall);
- `itr index` over the N unchanged files; `itr check --no-files`; `itr info`;
- `itr hash --dupes` (time and peak RSS), unless --no-dupes.

Each command is a whole process, timed with its peak RSS (ru_maxrss from wait4).

    python bench/scale.py --n 1000000 --out /var/tmp/itr-scale [--runs 5] [--no-dupes] [--json]
    python bench/scale.py --n 1000000 --out /var/tmp/itr-scale --build-only   # build only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # test support (model factory)
sys.path.insert(0, str(HERE))

from search_latency import clustered  # noqa: E402


def itr_cmd() -> list[str]:
    script = Path(sys.executable).with_name("itr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "itrcli"]


#: Runs one command and prints its wall time, peak RSS and exit code.  A small process of
#: its own: a child forked from this (large) bench process would start with its RSS.
_WRAP = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps([time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)]))
"""


def run_timed(args: list[str], timeout: float | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit code) of one whole `itr` process; exit -9 when it
    was killed at ``timeout``."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", _WRAP, *itr_cmd(), *map(str, args)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and the command it runs
        proc.wait()
        return float(timeout or 0), 0.0, -9
    return tuple(json.loads(out))


def build(n: int, out: Path) -> tuple[Path, Path]:
    """The library in 0.1.0's layout, and its files (reused when present and complete)."""
    from support import synth

    from itrcli.embed.textonnx import export
    from itrcli.library import Library
    from itrcli.store.db import Store
    from itrcli.store.vindex import VectorIndex, measure_search_ef

    model_dir = out / "vit-b32"
    if not (model_dir / "model.safetensors").exists():
        synth.make_vit_b32(model_dir)
    lib_dir, files = out / f"lib-{n}", out / f"files-{n}"
    done = lib_dir / ".built"
    if done.exists():
        return lib_dir, files
    import shutil

    shutil.rmtree(lib_dir, ignore_errors=True)
    files.mkdir(parents=True, exist_ok=True)
    t = time.time()
    for i in range(n):
        p = files / f"{i:07d}.jpg"
        if not p.exists():
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    print(f"[build] {n} files: {time.time() - t:.0f}s", file=sys.stderr)
    Store(lib_dir, create=True, vector_dtype="float32", page_size=4096).close()  # 0.1.0's layout
    lib = Library.open(lib_dir)
    enc = lib.encoder(str(model_dir), "cpu", "fp32")
    lib._bind(enc)
    export(enc, lib_dir)
    del enc
    lib.store.set_meta(roots=[str(files)])
    vecs = clustered(n, 512)
    t = time.time()
    with lib.store.transaction() as c:
        for i in range(n):
            p = files / f"{i:07d}.jpg"
            st = p.stat()
            lib.store.insert_file(c, str(p), {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                               "hash": f"{i:032x}", "width": 1, "height": 1}, vecs[i])
    del vecs
    print(f"[build] rows: {time.time() - t:.0f}s", file=sys.stderr)
    t = time.time()
    vi = VectorIndex(lib_dir, 512)
    vi.rebuild(lib.store)
    vi.save(lib.store.last_seq())
    lib.store.truncate_log(vi.seq)
    print(f"[build] graph: {time.time() - t:.0f}s", file=sys.stderr)
    measure_search_ef(vi, lib.store, lib.store.count())
    lib.close()
    done.touch()
    return lib_dir, files


def sizes(lib_dir: Path, n: int) -> dict:
    from itrcli.constants import DB_NAME, GRAPH_DIR, TEXT_TOWER_DIR

    def du(p: Path) -> int:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    db = sum(du(lib_dir / (DB_NAME + s)) for s in ("", "-wal", "-shm"))
    graph, tower = du(lib_dir / GRAPH_DIR), du(lib_dir / TEXT_TOWER_DIR)
    total = db + graph + tower
    return {"db": db, "graph": graph, "text_tower": tower, "total": total,
            "bytes_per_image": round(total / n), "db_per_image": round(db / n),
            "graph_per_image": round(graph / n), "tower_per_image": round(tower / n)}


def recall_measurement(lib_dir: Path) -> dict:
    """What `itr index` runs after (re)building a graph: the ef measurement, timed."""
    from itrcli.library import Library
    from itrcli.store.vindex import measure_search_ef

    with Library.open(lib_dir) as lib:
        lib.store.set_meta(search_ef=None, search_recall=None, search_ef_count=None)
        vi = lib.vector_index()
        t = time.perf_counter()
        measure_search_ef(vi, lib.store, lib.store.count())
        dt = time.perf_counter() - t
        return {"seconds": round(dt, 2), "ef": lib.store.get_meta("search_ef"),
                "recall@10": lib.store.get_meta("search_recall")}


def float16_quality(n: int, queries: int = 1000, chunk: int = 100_000) -> dict:
    """Exact search over the bench's N vectors in float32 and as float16 copies: R@K of
    text-like queries for the vector each was made from, top-10 agreement, score change."""
    import numpy as np

    from itrcli.store.vindex import text_like_queries

    vecs = clustered(n, 512)  # the same vectors the library was built from
    rng = np.random.default_rng(5)
    base = rng.choice(n, queries, replace=False)
    q = text_like_queries(vecs[base], seed=5)
    tops = {}
    worst = 0.0
    for name in ("float32", "float16"):
        best_s = np.full((queries, 0), -np.inf, np.float32)
        best_i = np.zeros((queries, 0), np.int64)
        for lo in range(0, n, chunk):
            m = vecs[lo : lo + chunk]
            if name == "float16":
                m16 = m.astype(np.float16).astype(np.float32)
                worst = max(worst, float(np.abs(q @ m16.T - q @ m.T).max()))
                m = m16
            s = np.concatenate([best_s, q @ m.T], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, lo + len(m)), (queries, len(m)))], axis=1)
            keep = np.argpartition(-s, 9, axis=1)[:, :10]
            best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        order = np.argsort(-best_s, axis=1)
        tops[name] = np.take_along_axis(best_i, order, 1)
    out = {"queries": queries, "max_score_change": float(f"{worst:.2e}"),
           "same_top10": int(sum(set(a) == set(b) for a, b in zip(tops["float32"], tops["float16"])))}
    for name, t in tops.items():
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = round(100 * float(np.mean((t[:, :k] == base[:, None]).any(1))), 2)
    return out


def commands(lib_dir: Path, files: Path, runs: int, dupes: bool) -> dict:
    db = ["--db", lib_dir]
    out: dict = {}
    run_timed(["search", "two children on a lawn", *db])  # page cache warm: process cold start
    s = [run_timed(["search", "two children on a lawn", *db]) for _ in range(runs)]
    out["search_s"] = round(statistics.median(x[0] for x in s), 3)
    out["search_rss_mib"] = round(max(x[1] for x in s))
    i = [run_timed(["info", *db]) for _ in range(runs)]
    out["info_s"] = round(statistics.median(x[0] for x in i), 3)
    t, rss, code = run_timed(["check", "--no-files", "-q", *db])
    out["check_no_files_s"], out["check_rss_mib"], out["check_code"] = round(t, 1), round(rss), code
    t, rss, code = run_timed(["index", files, "-q", *db])
    out["rerun_s"], out["rerun_rss_mib"], out["rerun_code"] = round(t, 1), round(rss), code
    if dupes:
        t, rss, code = run_timed(["hash", "--dupes", files, "-q", *db], timeout=900)
        out["dupes_s"], out["dupes_rss_mib"], out["dupes_code"] = round(t, 1), round(rss), code
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "scale")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-dupes", action="store_true", help="skip itr hash --dupes")
    ap.add_argument("--build-only", action="store_true",
                    help="build the library and stop (the build is not a measurement)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "itrcli")], check=True)
    lib_dir, files = build(a.n, a.out)
    if a.build_only:
        return
    from itrcli.library import Library

    with Library.open(lib_dir, readonly=True) as lib:
        layout = lib.store.layout()
    report: dict = {"n": a.n, "cpu": _cpu()}
    if layout["vector_dtype"] == "float32":
        report["before"] = {"layout": layout, "sizes": sizes(lib_dir, a.n),
                            **commands(lib_dir, files, a.runs, dupes=False)}
        t, rss, code = run_timed(["check", "--compact", "-q", "--db", lib_dir])
        report["compact"] = {"seconds": round(t, 1), "rss_mib": round(rss), "code": code}
    with Library.open(lib_dir, readonly=True) as lib:
        layout = lib.store.layout()
    report["float16_quality"] = float16_quality(a.n)
    report["after"] = {"layout": layout, "sizes": sizes(lib_dir, a.n),
                       "recall_measurement": recall_measurement(lib_dir),
                       **commands(lib_dir, files, a.runs, dupes=not a.no_dupes)}
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{a.n:,} images; {report['cpu']}")
    for name in ("before", "after"):
        r = report.get(name)
        if r is None:
            continue
        z, lay = r["sizes"], r["layout"]
        print(f"\n{name}: vectors {lay['vector_dtype']} in {lay['page_size'] // 1024} KiB pages")
        print(f"  bytes per image {z['bytes_per_image']:,} (database {z['db_per_image']:,}, graph "
              f"{z['graph_per_image']:,}, text tower {z['tower_per_image']:,}); total "
              f"{z['total'] / 1e9:.2f} GB")
        print(f"  cold itr search: median {r['search_s']:.3f} s, peak RSS {r['search_rss_mib']} MiB")
        print(f"  itr info: median {r['info_s']:.3f} s")
        print(f"  itr check --no-files: {r['check_no_files_s']} s (exit {r['check_code']}), "
              f"peak RSS {r['check_rss_mib']} MiB")
        print(f"  itr index over the unchanged files: {r['rerun_s']} s, peak RSS {r['rerun_rss_mib']} MiB")
        if "recall_measurement" in r:
            m = r["recall_measurement"]
            print(f"  recall measurement: {m['seconds']} s -> ef {m['ef']}, recall@10 {m['recall@10']}")
        if "dupes_s" in r:
            print(f"  itr hash --dupes: {r['dupes_s']} s (exit {r['dupes_code']}), peak RSS "
                  f"{r['dupes_rss_mib']} MiB")
        if name == "after":
            f = report["float16_quality"]
            print(f"  float16 copies against float32, exact search, {f['queries']} text-like queries: "
                  f"R@1/5/10 {f['float32_R@1']}/{f['float32_R@5']}/{f['float32_R@10']} -> "
                  f"{f['float16_R@1']}/{f['float16_R@5']}/{f['float16_R@10']}, same top 10 on "
                  f"{f['same_top10']}, largest score change {f['max_score_change']}")
        if name == "before" and "compact" in report:
            c = report["compact"]
            print(f"\nitr check --compact: {c['seconds']} s (exit {c['code']}), peak RSS {c['rss_mib']} MiB")


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = "avx512_bf16" if "avx512_bf16" in text else ("avx2, no avx512_bf16" if "avx2" in text else "no avx2")
    return f"{model}, {os.cpu_count()} cores, {flags}"


if __name__ == "__main__":
    main()
