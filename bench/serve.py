"""`itr serve`: warm text-search latency against a cold `itr search` on the same library,
and latency under concurrent clients, in one run (loopback only).

Builds (once, cached under bench/out/, as bench/search_latency.py does) a library of N
synthetic clustered vectors bound to a random-weight ViT-B/32 with its exported ONNX text
tower and HNSW graph.  Then:

1. cold: complete `itr search "..." --db LIB` processes (median of --cold-runs);
2. warm: a real `itr serve` on a free loopback port, --queries different text searches
   one after another over one keep-alive connection (p50, p99), interleaved with the cold
   processes (each cold run, then its share of warm searches); the texts are as people
   type them (3-12 words, median 12 tokens), and long sentences (~38 tokens) are timed
   apart as the hardest case (the text tower's work grows with the tokens);
3. load: --clients threads, each with its own connection, searching for --seconds
   (bounded), counting errors (p50, p99, searches per second);
4. the server's resident memory (VmRSS, its anonymous and file-backed parts, and its peak
   VmHWM) after the load.

Prints the ratios measured in this run (warm p50 / cold median).

    python bench/serve.py [--n 100000] [--queries 300] [--clients 32] [--seconds 60]
                          [--text-precision fp32|int8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

SUBJECTS = ("a dog", "two children", "a red bicycle", "an old man", "a cat", "a birthday cake",
            "a wooden boat", "three friends", "a train", "a bride", "a horse", "a yellow kite",
            "a street market", "a snowman", "a tall lighthouse", "a family picnic")
PLACES = ("on a lawn", "at the beach", "in the kitchen", "on a bridge", "in the snow",
          "by the harbour", "in a forest", "on a mountain", "in the city", "at a station",
          "in the garden", "near a lake", "on the road", "in a museum", "at school", "indoors")
TIMES = ("", " at dusk", " at night", " in the rain", " in summer", " at sunrise", " in autumn",
         " in the fog")
LEAD = ("", "photo of ", "blurry ", "close up of ")
TAIL = ("", " from above", " in black and white", " seen from far away")


def queries(n: int, start: int = 0) -> list[str]:
    """Different texts (no answer can come from a cache), as people type them: 3-9 words,
    ``two children on a lawn at dusk`` (6-13 tokens).  Up to 32,768 of them."""
    out = []
    for i in range(start, start + n):
        s, p, t, lead, tail = (i % 16, (i // 16) % 16, (i // 256) % 8, (i // 2048) % 4,
                               (i // 8192) % 4)
        out.append(f"{LEAD[lead]}{SUBJECTS[s]} {PLACES[(p + s) % 16]}{TIMES[t]}{TAIL[tail]}")
    return out


def long_queries(n: int) -> list[str]:
    """The hardest case, also measured: a sentence of ~25 words (~38 tokens)."""
    return [f"{q}, with {SUBJECTS[(i * 5) % 16]} {PLACES[(i * 3) % 16]} and "
            f"{SUBJECTS[(i * 7 + 1) % 16]} behind them, seen from far away"
            for i, q in enumerate(queries(n, 20_000))]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def search(self, text: str, n: int = 10) -> tuple[float, int]:
        path = "/api/search?" + urllib.parse.urlencode({"q": text, "n": n})
        t = time.perf_counter()
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        body = r.read()
        dt = time.perf_counter() - t
        self.timings = json.loads(body).get("timings", {}) if r.status == 200 else {}
        return dt, r.status


def rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="library size")
    ap.add_argument("--queries", type=int, default=300, help="warm searches, one at a time")
    ap.add_argument("--cold-runs", type=int, default=7, help="cold itr search processes")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (at most 64)")
    ap.add_argument("--seconds", type=float, default=60.0, help="load duration (at most 300)")
    ap.add_argument("--text-precision", choices=("fp32", "int8"), default="fp32",
                    help="the text tower of the server and of the cold searches")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args()
    clients = max(1, min(a.clients, 64))
    seconds = max(1.0, min(a.seconds, 300.0))

    from search_latency import build
    from support import serving

    lib_dir = build(a.n)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "itrcli")],
                   check=True)
    script = Path(sys.executable).with_name("itr")
    itr = [str(script)] if script.exists() else [sys.executable, "-m", "itrcli"]

    cold_cmd = itr + ["search", "two children on a lawn", "--db", str(lib_dir),
                      "--text-precision", a.text_precision]
    subprocess.run(cold_cmd, check=True, stdout=subprocess.DEVNULL)  # page cache warm

    with serving.start(lib_dir, "--text-precision", a.text_precision) as s:
        c = Client(s.url)
        for q in queries(20):
            c.search(q)  # warm-up: first requests, page cache
        # 1 and 2, interleaved: a shared machine's load moves between minutes, so each
        # cold process is followed by its share of warm searches (the ratio compares
        # like with like)
        cold, warm, embed = [], [], []
        texts = queries(a.queries, start=100)
        per = max(1, len(texts) // a.cold_runs)
        for r in range(a.cold_runs):
            t = time.perf_counter()
            subprocess.run(cold_cmd, check=True, stdout=subprocess.DEVNULL)
            cold.append(time.perf_counter() - t)
            for q in texts[r * per:(r + 1) * per]:
                dt, status = c.search(q)
                assert status == 200, status
                warm.append(dt)
                embed.append(c.timings.get("embed", 0.0))
        # the hardest text: long sentences (~38 tokens), one at a time
        long = []
        for q in long_queries(max(20, a.queries // 4)):
            dt, status = c.search(q)
            assert status == 200, status
            long.append(dt)
        server_side = json.loads(urllib.request.urlopen(
            s.url + "/api/search?q=two+children+on+a+lawn").read())["timings"]

        # 3. concurrent clients, bounded in count and time
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def worker(k: int) -> None:
            cl = Client(s.url)
            mine, bad, i = [], [], 0
            while time.monotonic() < stop:
                try:  # every client its own texts, none asked twice (while 32,768 last)
                    dt, status = cl.search(queries(1, start=1000 + k + clients * i)[0])
                    if status != 200:
                        bad.append(str(status))
                    mine.append(dt)
                except Exception as e:  # a refused or dropped connection counts as an error
                    bad.append(type(e).__name__)
                    cl = Client(s.url)
                i += 1
            with lock:
                lat.extend(mine)
                errors.extend(bad)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
        wall = time.monotonic() - t0
        mem = rss(s.proc.pid)
        code = s.stop()

    cold_med = statistics.median(cold)
    out = {
        "library": a.n,
        "text_precision": a.text_precision,
        "cold_itr_search_s": {"median": round(cold_med, 4), "runs": a.cold_runs},
        "warm_ms": {"p50": round(pct(warm, 50) * 1e3, 2), "p99": round(pct(warm, 99) * 1e3, 2),
                    "queries": len(warm)},
        "warm_p50_over_cold": round(pct(warm, 50) / cold_med, 4),
        "warm_long_text_ms": {"p50": round(pct(long, 50) * 1e3, 2),
                              "p99": round(pct(long, 99) * 1e3, 2), "queries": len(long)},
        # of which the text tower (the server's own timing of the query's embedding)
        "warm_text_tower_ms_p50": round(pct(embed, 50) * 1e3, 2),
        "server_timings_s": server_side,
        "load": {"clients": clients, "seconds": round(wall, 1), "searches": len(lat),
                 "errors": len(errors), "per_second": round(len(lat) / wall, 1),
                 "p50_ms": round(pct(lat, 50) * 1e3, 1) if lat else None,
                 "p99_ms": round(pct(lat, 99) * 1e3, 1) if lat else None},
        "server_rss_mib": {k: round(v / 2**20) for k, v in mem.items()},
        "server_exit": code,
    }
    if a.json:
        print(json.dumps(out, indent=2))
        return
    w, ld = out["warm_ms"], out["load"]
    print(f"library: {a.n:,} vectors; text tower {a.text_precision}")
    print(f"cold itr search: median {cold_med:.3f} s ({a.cold_runs} runs)")
    print(f"warm itr serve text search: p50 {w['p50']} ms  p99 {w['p99']} ms ({w['queries']} queries)")
    print(f"  of which the text tower: p50 {out['warm_text_tower_ms_p50']} ms")
    print(f"ratio warm p50 / cold median: {out['warm_p50_over_cold']:.3f}")
    lw = out["warm_long_text_ms"]
    print(f"warm, long texts (~38 tokens): p50 {lw['p50']} ms  p99 {lw['p99']} ms "
          f"({lw['queries']} queries)")
    print(f"load: {ld['clients']} clients for {ld['seconds']} s: {ld['searches']} searches "
          f"({ld['per_second']}/s), {ld['errors']} errors, p50 {ld['p50_ms']} ms, p99 {ld['p99_ms']} ms")
    m = out["server_rss_mib"]
    print(f"server memory after load: VmRSS {m.get('VmRSS')} MiB (anonymous {m.get('RssAnon')}, "
          f"file pages {m.get('RssFile')}: the mapped graph's, clean, shared with the page "
          f"cache), peak {m.get('VmHWM')} MiB; exit code {code}")


if __name__ == "__main__":
    main()
