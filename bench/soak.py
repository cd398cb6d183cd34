"""Soak test of the web app: minutes of mixed requests against a real server on 127.0.0.1.

Starts ``cxrlens serve`` (the library's ``serve``) in a subprocess on a free loopback port with two
untrained resnet18 run folders (inference and explanation cost do not depend on the weights) and the
vendored data set, then sends one request after another, round robin over: predict (real X-rays),
explain (Grad-CAM and saliency of the upload), an occlusion job polled to the end, the reader study
(next image + ratings), an abandoned client (an occlusion request whose client gives up after
--abandon-after s), an oversize upload (413) and an upload from a foreign origin (403). Bounded by
--seconds and --max-requests. Prints requests, failures by status (a failure is any status other than
the expected one), p50/p95 latency per kind, and the server's resident memory after a warm-up round
and at the end, which must stay within --rss-margin. The server sets its allocator as ``cxrlens serve`` does
(glibc keeps freed memory); ``CXRLENS_MALLOC=system`` in the environment runs it with glibc's defaults.

    .venv/bin/python bench/soak.py [--seconds 120] [--image-size 128] [--save bench/soak_results.md]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from _machine import cpu_name  # bench/ is on sys.path when run as a script
from load_test import IMAGES, free_port, make_runs

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Soak:
    """One client that sends the mixed requests in turn and records status and latency per kind."""

    def __init__(self, base: str, abandon_after: float) -> None:
        self.http = httpx.Client(base_url=base, timeout=300)
        self.base, self.abandon_after = base, abandon_after
        self.images = itertools.cycle(IMAGES)
        self.outcomes: Counter = Counter()  # (kind, status or error name) -> count
        self.failures: Counter = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.upload_id: str | None = None
        self.raters = itertools.cycle([f"soak-{i}" for i in range(5)])

    def timed(self, kind: str, expected: int | str, send: Callable[[], httpx.Response | str]) -> object:
        started = time.perf_counter()
        try:
            response = send()
            status = response if isinstance(response, str) else response.status_code
        except httpx.HTTPError as exc:
            response, status = None, type(exc).__name__
        self.outcomes[(kind, status)] += 1
        if status != expected:
            self.failures[(kind, status)] += 1
        else:
            self.latency[kind].append(time.perf_counter() - started)
        return response

    def predict(self) -> None:
        path = next(self.images)
        response = self.timed("predict", 200, lambda: self.http.post(
            "/api/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}))
        if response is not None and not isinstance(response, str) and response.status_code == 200:
            self.upload_id = response.json()["upload_id"]

    def explain(self) -> None:
        if self.upload_id is None:
            return self.predict()
        for method in ("grad_cam", "saliency"):
            self.timed("explain", 200, lambda m=method: self.http.post(
                "/api/explain", json={"upload_id": self.upload_id, "method": m, "cls": "COVID-19"}))

    def occlusion_job(self) -> None:
        def run() -> str:
            job = self.http.post("/api/jobs/explain", json={"index": 0, "method": "occlusion", "cls": "Normal"})
            if job.status_code != 202:
                return str(job.status_code)
            state = job.json()
            while state["state"] in ("queued", "running"):
                time.sleep(0.2)
                state = self.http.get(f"/api/jobs/{state['id']}").json()
            return state["state"]

        self.timed("occlusion job", "done", run)

    def study(self) -> None:
        rater = next(self.raters)
        item = self.timed("study next", 200, lambda: self.http.get("/api/study/next", params={"rater": rater}))
        if item is None or isinstance(item, str) or item.status_code != 200 or item.json()["done"]:
            return
        body = item.json()
        ratings = [{"token": m["token"], "score": 1 + i % 5} for i, m in enumerate(body["maps"])]
        self.timed("ratings", 201, lambda: self.http.post(
            "/api/ratings", json={"rater": rater, "image_id": body["image_id"], "ratings": ratings}))

    def abandoned(self) -> None:
        """An occlusion request whose client stops waiting: the server must not keep working for it."""
        self.timed("abandoned client", "ReadTimeout", lambda: httpx.post(
            self.base + "/api/explain", json={"index": 1, "method": "occlusion", "cls": "COVID-19"},
            timeout=httpx.Timeout(30, read=self.abandon_after)))

    def hostile(self) -> None:
        big = b"\xff\xd8\xff" + bytes(21 * MB)
        self.timed("oversize upload", 413, lambda: self.http.post(
            "/api/predict", files={"file": ("big.jpg", big, "image/jpeg")}))
        path = next(self.images)
        self.timed("foreign origin", 403, lambda: self.http.post(
            "/api/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
            headers={"Origin": "http://evil.example"}))

    def round(self) -> None:
        for step in (self.predict, self.explain, self.occlusion_job, self.study, self.abandoned, self.hostile):
            step()


def start_server(runs: list[Path], tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = (f"from cxrlens.serve import serve; serve({[str(r) for r in runs]!r}, "
            f"data={str(ROOT / 'data' / 'cxr3')!r}, port={port}, study_images=6, "
            f"study_methods=('grad_cam', 'saliency'), ratings_db={str(tmp / 'ratings.sqlite')!r})")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(base + "/api/info", timeout=2).raise_for_status()
            return server, base
        except httpx.HTTPError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.3)


def malloc_choice() -> str:
    """What the server subprocess (it inherits this environment) does with glibc's malloc at start."""
    return os.environ.get("CXRLENS_MALLOC", "keep") or "keep"


def report(soak: Soak, rss: list[tuple[float, float]], wall: float, args: argparse.Namespace) -> list[str]:
    total = sum(soak.outcomes.values())
    failures = sum(soak.failures.values())
    lines = [f"requests: {total} in {wall:.0f} s (one client, one request at a time), "
             f"failures: {failures} ({', '.join(f'{k} -> {s}: {n}' for (k, s), n in soak.failures.items()) or 'none'})"]
    for kind in dict.fromkeys(k for k, _ in soak.outcomes):
        ms = np.array(soak.latency[kind]) * 1000
        counts = ", ".join(f"{s}: {n}" for (k, s), n in soak.outcomes.items() if k == kind)
        timing = f"p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms" if len(ms) else "no latency"
        lines.append(f"  {kind:<17} {counts:<28} {timing}")
    queue = soak.http.get("/api/info").json()["queue"]
    lines.append("server's job queue since it started: " + ", ".join(f"{k} {v}" for k, v in sorted(queue.items())))
    start, end = rss[0][1], rss[-1][1]
    shown = rss[:: max(1, len(rss) // 8)] + ([rss[-1]] if (len(rss) - 1) % max(1, len(rss) // 8) else [])
    lines.append(f"server RSS: {start:.0f} MB after the warm-up round, {end:.0f} MB at the end "
                 f"({(end - start) / start:+.1%}; allowed {args.rss_margin:+.0%}); samples: "
                 + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in shown))
    lines.append(f"server's allocator: CXRLENS_MALLOC={malloc_choice()} (`serve` calls "
                 "cxrlens.runtime.keep_freed_memory; keep: glibc keeps freed memory, system: glibc's defaults)")
    lines.append(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores available, load average "
                 f"{os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="stop starting rounds after this long")
    parser.add_argument("--max-requests", type=int, default=2000, help="stop after this many requests")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--abandon-after", type=float, default=0.3, help="abandoned client's read timeout, s")
    parser.add_argument("--rss-margin", type=float, default=0.10, help="allowed RSS growth after warm-up")
    parser.add_argument("--save", help="append the results as markdown to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server, base = start_server(make_runs(Path(tmp), args.image_size), Path(tmp))
        try:
            soak = Soak(base, args.abandon_after)
            soak.round()  # warm-up: models rewritten, caches filled, thread pools started
            warm_up_failures = sum(soak.failures.values())
            for counter in (soak.outcomes, soak.failures, soak.latency):
                counter.clear()
            began = time.monotonic()
            rss = [(0.0, rss_mb(server.pid))]
            while time.monotonic() - began < args.seconds and sum(soak.outcomes.values()) < args.max_requests:
                soak.round()
                rss.append((time.monotonic() - began, rss_mb(server.pid)))
            wall = time.monotonic() - began
            lines = report(soak, rss, wall, args)
        finally:
            server.terminate()
            server.wait(10)
    lines.insert(0, f"warm-up round (not counted below): {warm_up_failures} failures")
    print("\n".join(lines))
    if args.save:
        env = "CXRLENS_MALLOC=system " if malloc_choice() == "system" else ""
        command = f"$ {env}.venv/bin/python bench/soak.py --seconds {args.seconds:g} --image-size {args.image_size}"
        block = f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n\n```\n{command}\n" + "\n".join(lines) + "\n```\n"
        path = Path(args.save)
        path.write_text((path.read_text() if path.exists() else "# Web app soak test\n") + block)
    grew = rss[-1][1] > rss[0][1] * (1 + args.rss_margin)
    if warm_up_failures or sum(soak.failures.values()) or grew:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
