"""Serving under load: N concurrent clients against the running web app for a bounded time, with batching
of concurrent generation requests on and off.

Each run starts apps/web/serve.py in its own process on a free port (the model: a trained tiny ChuXin run
directory, default output/chuxin_tiny from `make demo`), waits for /health, then N clients each send
streamed /generate requests back to back (greedy, `--new-tokens` tokens, prompts from
configs/chuxin/prompts.txt) for `--seconds`. Latency is a request's whole time (first byte to `done`);
tokens/s counts generated tokens (the `done` event's count) over the measured time; a failed request is a
non-200 answer, an `error` event or a broken connection. Prints a markdown table and the on/off ratios, then
one JSON line. Or point it at a server already running with --url (one run, whatever its settings).

    python benchmarks/bench_serve.py [--clients 8] [--seconds 20] [--new-tokens 32] [--ckpt output/chuxin_tiny]
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402


def read_prompts():
    lines = (REPO / "configs" / "chuxin" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.replace("\\n", "\n") for line in lines if line.strip()]


async def one_request(client, prompt, new_tokens):
    """(ok, seconds, tokens, batch size) of one streamed generation."""
    start = time.perf_counter()
    tokens, batch, ok = 0, 0, False
    try:
        async with client.stream("POST", "/generate", json={"prompt": prompt, "max_new_tokens": new_tokens}) as r:
            if r.status_code != 200:
                await r.aread()
                return False, time.perf_counter() - start, 0, 0
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("done", "error"):
                    data = json.loads(line[6:])
                    ok = event == "done"
                    tokens, batch = data.get("tokens", 0), data.get("batch_size", 0)
    except httpx.HTTPError:
        ok = False
    return ok, time.perf_counter() - start, tokens, batch


async def load(url, clients, seconds, new_tokens):
    prompts = read_prompts()
    results = []
    stop_at = time.perf_counter() + seconds

    async def client_loop(i, client):
        n = 0
        while time.perf_counter() < stop_at:
            results.append(await one_request(client, prompts[(i + n) % len(prompts)], new_tokens))
            n += 1

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(i, client) for i in range(clients)])
        elapsed = time.perf_counter() - start
    done = [r for r in results if r[0]]
    latencies = np.array([r[1] for r in done]) if done else np.array([np.nan])
    return {"requests": len(results), "failed": len(results) - len(done), "seconds": round(elapsed, 2),
            "requests_per_s": len(done) / elapsed, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "tokens_per_s": sum(r[2] for r in done) / elapsed,
            "mean_batch": float(np.mean([r[3] for r in done])) if done else 0.0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(ckpt, batching, port, max_batch):
    config = {"models": [{"name": "chuxin", "checkpoint": ckpt}],
              "limits": {"max_batch": max_batch, "batching": batching, "max_pending": 256}}
    path = Path(tempfile.mkdtemp()) / "serve.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen([sys.executable, "apps/web/serve.py", "-c", str(path), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("the server did not answer /health within 180 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--url", help="a running server to load (skips starting one, one run)")
    parser.add_argument("--ckpt", default="output/chuxin_tiny", help="text model run directory to serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()

    runs = {}
    if args.url:
        runs["as running"] = asyncio.run(load(args.url, args.clients, args.seconds, args.new_tokens))
    else:
        if not (REPO / args.ckpt).is_dir():
            raise SystemExit(f"{args.ckpt} does not exist: run `make demo` first (or pass --ckpt / --url).")
        for name, batching in (("batching on", True), ("batching off", False)):
            process, url = serve(args.ckpt, batching, free_port(), args.max_batch)
            try:
                asyncio.run(load(url, 1, 2, args.new_tokens))  # warm-up: first calls build kernels and caches
                runs[name] = asyncio.run(load(url, args.clients, args.seconds, args.new_tokens))
            finally:
                process.terminate()
                process.wait(timeout=30)

    print(f"\n{args.clients} clients, {args.seconds:g} s, {args.new_tokens} new tokens a request, greedy, "
          f"{os.cpu_count()} CPU cores\n")
    print("| run | requests | failed | requests/s | p50 latency s | p99 latency s | tokens/s | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['requests']} | {r['failed']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | "
              f"{r['p99_s']:.3f} | {r['tokens_per_s']:.1f} | {r['mean_batch']:.2f} |")
    if len(runs) == 2:
        on, off = runs["batching on"], runs["batching off"]
        print(f"\nbatching on / off: requests/s x{on['requests_per_s'] / off['requests_per_s']:.2f}, tokens/s "
              f"x{on['tokens_per_s'] / off['tokens_per_s']:.2f}, p50 latency x{on['p50_s'] / off['p50_s']:.2f}")
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "new_tokens": args.new_tokens, "runs": runs}))


if __name__ == "__main__":
    main()
