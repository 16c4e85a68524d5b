"""HTTP benchmark of ``dermscreen serve`` on loopback: cold start, memory, latency and throughput, soak.

Starts the server as a subprocess on 127.0.0.1 (a free port), times how long until /healthz answers
(``--starts`` fresh servers, default 5: median and slowest), then posts real images (multipart, as the web
page does) with a small asyncio + httpx client at each concurrency, and reports p50/p95 latency, requests/s,
errors and the server's memory: PSS summed over its processes (the server and its analysis helper, forked
after the model is loaded, share most pages; PSS counts a shared page once, split between them, where adding
their RSS would count it twice) and each process's RSS.
``--soak SECONDS`` then keeps concurrency 8 busy for that long and prints start/end memory.
All traffic goes to 127.0.0.1; every loop is bounded by a request count or a deadline.

    python benchmarks/bench_http.py --model path/to/bundle --images ../shared/data/ham10000/images
    python benchmarks/bench_http.py --model path/to/bundle --soak 300
    python benchmarks/bench_http.py --wrk 10 --concurrency 16 --compare DERMSCREEN_HELPER_PROCESS=false
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "ham10000" / "images"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, workers: int, extra_env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    """Start the server; returns (process, seconds until /healthz answered 200)."""
    cmd = [sys.executable, "-m", "dermscreen.serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **extra_env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + 60
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("server did not answer /healthz within 60 s")


def server_env(args) -> dict[str, str]:
    """The server's environment overrides: quiet logs, plus any --env NAME=VALUE."""
    env = {"DERMSCREEN_LOG_LEVEL": "warning"}
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def cold_starts(model: str | None, workers: int, n: int, env: dict[str, str]) -> list[float]:
    """Seconds until /healthz answered for ``n`` fresh servers started one after another (each stopped after).

    One start is a noisy sample on a small VM (its speed drifts within a minute, and the first start after a
    while reads the packages from disk); the benchmark reports the median and the slowest of several."""
    times = []
    for _ in range(n):
        proc, seconds = start_server(model, free_port(), workers, env)
        proc.terminate()
        proc.wait(timeout=15)
        times.append(seconds)
    return times


def describe_starts(times: list[float]) -> str:
    return (f"median {statistics.median(times):.2f} s, slowest {max(times):.2f} s over {len(times)} starts "
            f"({' / '.join(f'{t:.2f}' for t in times)})")


def server_memory(proc: subprocess.Popen) -> dict:
    """The server's memory in MiB: ``pss``, summed over the server and its child processes (a page shared by
    k processes counts 1/k in each, so the total is what the machine holds for the server), and ``rss`` of
    each process (server first)."""
    parent = psutil.Process(proc.pid)
    full = [p.memory_full_info() for p in (parent, *parent.children(recursive=True)) if p.is_running()]
    return {"pss": round(sum(f.pss for f in full) / 2**20, 1), "rss": [round(f.rss / 2**20, 1) for f in full]}


def describe_memory(m: dict) -> str:
    return f"{m['pss']} MB PSS over {len(m['rss'])} process(es) (RSS {' + '.join(map(str, m['rss']))} MB)"


def load_images(folder: Path, count: int) -> list[tuple[str, bytes]]:
    """The first ``count`` JPEGs of ``folder`` (sorted by name) as (name, bytes)."""
    paths = sorted(folder.glob("*.jpg"))[:count]
    if not paths:
        raise SystemExit(f"no .jpg images in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


async def run_load(url: str, images: list[tuple[str, bytes]], concurrency: int, requests: int | None,
                   deadline: float | None, heatmap: bool) -> dict:
    """Post images with ``concurrency`` clients until ``requests`` are done or ``deadline`` passes."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while (requests is None or issued < requests) and (deadline is None or time.perf_counter() < deadline):
            name, data = images[issued % len(images)]
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url, files={"image": (name, data, "image/jpeg")},
                                    data={"heatmap": "true" if heatmap else "false"})
                key = None if r.status_code == 200 else f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key:
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append((time.perf_counter() - t0) * 1000)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(latencies, errors, wall, concurrency)


def summarize(latencies: list[float], errors: dict[str, int], wall: float, concurrency: int) -> dict:
    """p50/p95 latency (ms), requests/s and error counts of one load run."""
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "ok": len(ordered), "errors": sum(errors.values()), "error_kinds": errors,
            "p50_ms": round(statistics.median(ordered), 1) if ordered else None, "p95_ms": round(pick(0.95), 1),
            "rps": round(len(ordered) / wall, 1) if wall > 0 else None, "wall_s": round(wall, 1)}


def soak(proc: subprocess.Popen, url: str, images: list[tuple[str, bytes]], seconds: float, concurrency: int,
         heatmap: bool) -> dict:
    """Keep ``concurrency`` clients busy for ``seconds``; memory (PSS total) at start, end and its maximum,
    sampled per slice."""
    mem = [server_memory(proc)]
    totals = {"ok": 0, "errors": 0}
    latencies_p50 = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        slice_end = min(end, time.perf_counter() + 30)  # 30 s slices: memory sampled ~10 times in 5 min
        result = asyncio.run(run_load(url, images, concurrency, None, slice_end, heatmap))
        totals["ok"] += result["ok"]
        totals["errors"] += result["errors"]
        latencies_p50.append(result["p50_ms"])
        mem.append(server_memory(proc))
    pss = [m["pss"] for m in mem]
    return {"seconds": seconds, "concurrency": concurrency, **totals, "pss_start_mb": pss[0], "pss_end_mb": pss[-1],
            "pss_max_mb": max(pss), "pss_samples_mb": pss, "rss_start_mb": mem[0]["rss"], "rss_end_mb": mem[-1]["rss"],
            "p50_ms_per_slice": latencies_p50}


def main() -> None:
    """Parse arguments, run the benchmark, print a JSON report and a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle folder or zip (default: $DERMSCREEN_MODEL or the shipped model)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of real .jpg images")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level (after warm-up)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="server setting for this run, e.g. DERMSCREEN_HELPER_PROCESS=false (repeatable)")
    ap.add_argument("--no-heatmap", action="store_true", help="ask for no heatmap (the page asks for one)")
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak at --soak-concurrency after the runs (e.g. 300)")
    ap.add_argument("--soak-concurrency", type=int, default=8)
    ap.add_argument("--starts", type=int, default=5, help="cold starts to time (the last one serves the load)")
    ap.add_argument("--label", default="", help="text to print with the results, e.g. the model and machine")
    ap.add_argument("--wrk", type=float, default=0, metavar="SECONDS",
                    help="instead: load each concurrency for SECONDS with wrk (C, Debian package 'wrk'; far less CPU "
                         "than this Python client takes from the server on a small machine) and print its report")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=VALUE",
                    help="with --wrk: an A/B instead: a second server with these settings (repeatable) runs beside "
                         "the first (--env), and wrk loads the two in turns for --rounds rounds at each "
                         "concurrency, so the VM's drift hits both alike")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the --compare A/B")
    args = ap.parse_args()
    if args.compare and not args.wrk:
        ap.error("--compare needs --wrk SECONDS (the A/B is loaded by wrk)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_screening import cpu_probe_ms, machine_info

    print(machine_info())  # the VM's speed drifts: the probe before and after says in which phase this ran
    try:
        if args.wrk and args.compare:
            return compare_runs(args)
        if args.wrk:
            return wrk_runs(args)
        return client_runs(args)
    finally:
        print(f"CPU probe after the runs: {cpu_probe_ms():.0f} ms")


def client_runs(args) -> None:
    """Load the server with the async httpx client at each concurrency (and the soak) and print the report."""

    images = load_images(args.images, args.num_images)
    starts = cold_starts(args.model, args.workers, args.starts - 1, server_env(args))
    port = free_port()
    proc, cold_start = start_server(args.model, port, args.workers, server_env(args))
    starts.append(cold_start)
    url = f"http://127.0.0.1:{port}/api/v1/analyze"
    heatmap = not args.no_heatmap
    try:
        report = {"label": args.label, "cold_start_s": [round(t, 2) for t in starts],
                  "memory_idle": server_memory(proc), "env": args.env,
                  "model": httpx.get(f"http://127.0.0.1:{port}/healthz").json()["model"], "heatmap": heatmap, "runs": []}
        asyncio.run(run_load(url, images, 2, 20, None, heatmap))  # warm-up: first-call allocations, caches
        for c in args.concurrency:
            report["runs"].append(asyncio.run(run_load(url, images, c, args.requests, None, heatmap)))
        report["memory_after_load"] = server_memory(proc)
        if args.soak > 0:
            report["soak"] = soak(proc, url, images, args.soak, args.soak_concurrency, heatmap)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    print(json.dumps(report, indent=2))
    print(markdown(report))


def wrk_paths(args) -> list[Path]:
    """The images wrk posts, after checking that wrk is installed."""
    import shutil

    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return sorted(args.images.glob("*.jpg"))[: args.num_images]


def run_wrk(url: str, paths: list[Path], concurrency: int, seconds: float, *extra: str) -> str:
    """wrk's report of ``seconds`` posting ``paths`` to ``url`` (one wrk thread per 8 connections, at most 2)."""
    script = Path(__file__).with_name("wrk_analyze.lua")
    return subprocess.run(["wrk", f"-t{max(1, min(2, concurrency // 8))}", f"-c{concurrency}",
                           f"-d{max(1, round(seconds))}s", *extra, "--timeout", "30s", "-s", str(script), url, "--",
                           *map(str, paths)], check=True, capture_output=True, text=True).stdout


def wrk_rps(url: str, paths: list[Path], concurrency: int, seconds: float) -> tuple[float, int]:
    """(requests/s, non-2xx answers + socket errors) of one wrk run posting ``paths`` to ``url``."""
    import re

    out = run_wrk(url, paths, concurrency, seconds)
    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    bad += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), bad


def compare_runs(args) -> None:
    """A/B: two servers side by side (A: --env, B: --env plus --compare), loaded by wrk in turns."""
    from bench_screening import cpu_probe_ms

    paths = wrk_paths(args)
    envs = {"A": server_env(args), "B": {**server_env(args), **dict(item.partition("=")[::2] for item in args.compare)}}
    servers = {}
    try:
        for name, env in envs.items():
            port = free_port()
            servers[name] = (f"http://127.0.0.1:{port}/api/v1/analyze", start_server(args.model, port, args.workers,
                                                                                      env)[0])
            wrk_rps(servers[name][0], paths, 2, 3)  # warm-up
        print(f"A: {' '.join(args.env) or 'defaults'}; B: A + {' '.join(args.compare)}; wrk {args.wrk:g} s per run")
        for c in args.concurrency:
            rps: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(args.rounds):
                line = []
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):  # who goes first alternates
                    value, bad = wrk_rps(servers[name][0], paths, c, args.wrk)
                    rps[name].append(value)
                    line.append(f"{name} {value:.1f} req/s ({bad} errors)")
                print(f"c={c} round {r} {time.strftime('%H:%M:%S')}: {', '.join(line)}; probe {cpu_probe_ms():.0f} ms",
                      flush=True)
            ratios = [b / a for a, b in zip(rps["A"], rps["B"])]
            print(f"c={c}: median A {statistics.median(rps['A']):.1f}, B {statistics.median(rps['B']):.1f} req/s; "
                  f"B/A per round {' '.join(f'{x:.2f}' for x in ratios)}")
        for name, (_, proc) in servers.items():
            print(f"memory {name}: {describe_memory(server_memory(proc))}")
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=15)


def wrk_runs(args) -> None:
    """Load the server with wrk at each concurrency (one wrk thread per 8 connections) and print its reports."""
    paths = wrk_paths(args)
    starts = cold_starts(args.model, args.workers, args.starts - 1, server_env(args))
    port = free_port()
    proc, cold_start = start_server(args.model, port, args.workers, server_env(args))
    starts.append(cold_start)
    url = f"http://127.0.0.1:{port}/api/v1/analyze"
    try:
        print(f"cold start {describe_starts(starts)}; memory idle {describe_memory(server_memory(proc))}; "
              f"wrk {args.wrk:g} s per level")
        run_wrk(url, paths, 2, 3)  # warm-up
        for c in args.concurrency:
            out = run_wrk(url, paths, c, args.wrk, "--latency")
            print(f"\n### concurrency {c}\n```\n{out.strip()}\n```")
        print(f"\nmemory after load {describe_memory(server_memory(proc))}")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def markdown(report: dict) -> str:
    """The report as a Markdown table, for benchmarks/RESULTS.md."""
    lines = [f"Model {report['model']['name']} {report['model']['version']}; {report['label']}",
             f"cold start {describe_starts(report['cold_start_s'])}; "
             f"memory idle {describe_memory(report['memory_idle'])}, "
             f"after load {describe_memory(report['memory_after_load'])}; "
             f"heatmap {'on' if report['heatmap'] else 'off'}"
             + (f"; server env {' '.join(report['env'])}" if report["env"] else ""), "",
             "| concurrency | requests | errors | p50 ms | p95 ms | req/s |", "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['concurrency']} | {r['ok']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | {r['rps']} |")
    if "soak" in report:
        s = report["soak"]
        lines += ["", f"soak {s['seconds']:.0f} s at concurrency {s['concurrency']}: {s['ok']} requests, {s['errors']} errors, "
                      f"PSS start {s['pss_start_mb']} MB, end {s['pss_end_mb']} MB, max {s['pss_max_mb']} MB "
                      f"(RSS per process start {s['rss_start_mb']}, end {s['rss_end_mb']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
