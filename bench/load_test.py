"""Load test of the web app: 200 predict requests from 20 concurrent clients against a real server.

Starts ``cxrlens.serve.serve`` in a subprocess on a free loopback port, uploads real X-rays of
data/cxr3 with httpx (async), and prints failures and latency percentiles. Without --runs it makes
two untrained resnet18 run folders at 224 px (inference cost does not depend on the weights).

    .venv/bin/python bench/load_test.py [--runs RUN ...] [--requests 200] [--clients 20] [--save bench/load_results.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "data" / "cxr3" / "images").glob("*.jpg"))


def make_runs(folder: Path, size: int) -> list[Path]:
    import torch

    from cxrlens.models import create_model
    from cxrlens.runs import TrainConfig, save_model_weights

    runs = []
    for seed in (1, 2):
        path = folder / f"resnet18-{seed}"
        path.mkdir(parents=True)
        torch.manual_seed(seed)
        TrainConfig(model="resnet18", image_size=size, out=str(path)).save(path)
        save_model_weights(create_model("resnet18", 3), path / "best.safetensors")
        runs.append(path)
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def run_load(base: str, n_requests: int, n_clients: int) -> tuple[list[float], Counter]:
    payloads = [p.read_bytes() for p in IMAGES[: max(n_requests, 1)]]
    latencies: list[float] = []
    outcomes: Counter = Counter()
    next_index = iter(range(n_requests))

    async def client() -> None:
        # each simulated user has its own connection pool, as separate browsers would
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            for i in next_index:
                data = payloads[i % len(payloads)]
                started = time.perf_counter()
                try:
                    response = await http.post("/api/predict", files={"file": (f"{i}.jpg", data, "image/jpeg")})
                    outcomes[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(client() for _ in range(n_clients)))
    return latencies, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", help="run folders (default: two untrained resnet18 runs)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--save", help="append the results as markdown to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(r) for r in args.runs] if args.runs else make_runs(Path(tmp), args.image_size)
        port = free_port()
        code = (f"from cxrlens.serve import serve; serve({[str(r) for r in runs]!r}, port={port}, "
                f"ratings_db={str(Path(tmp) / 'ratings.sqlite')!r})")
        server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    info = httpx.get(base + "/api/info", timeout=2).json()
                    break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.3)
            load = os.getloadavg()[0]  # other work on the machine inflates latency: say how much there was
            started = time.perf_counter()
            latencies, outcomes = asyncio.run(run_load(base, args.requests, args.clients))
            wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(10)

    failures = args.requests - outcomes.get(200, 0)
    ms = np.array(latencies) * 1000
    models = ", ".join(f"{m['name']} ({m['model']}, {m['image_size']} px)" for m in info["models"])
    lines = [
        f"requests: {args.requests} from {args.clients} concurrent clients, models: {models}",
        f"succeeded: {outcomes.get(200, 0)}, failures: {failures} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items(), key=str) if k != 200) or 'none'})",
        f"latency ms: p50 {np.percentile(ms, 50):.0f}, p95 {np.percentile(ms, 95):.0f}, max {ms.max():.0f}"
        if len(ms) else "latency: no successful request",
        f"wall time: {wall:.1f} s, throughput {outcomes.get(200, 0) / wall:.1f} requests/s",
        f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores available, load average {load:.1f} at the "
        f"start; Python {platform.python_version()}",
    ]
    print("\n".join(lines))
    if args.save:
        block = (f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n\n```\n$ .venv/bin/python bench/load_test.py "
                 f"--requests {args.requests} --clients {args.clients}\n" + "\n".join(lines) + "\n```\n")
        path = Path(args.save)
        header = "" if path.exists() else (
            "# Web app load test\n\n`bench/load_test.py`: a real uvicorn server in a subprocess, predict requests "
            "with real X-rays from concurrent httpx clients. Model work is serialised through one worker thread "
            "behind a bounded queue (32 waiting), so latency grows with the queue while nothing fails.\n")
        path.write_text((path.read_text() if path.exists() else header) + block)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
