"""Serving under load on loopback: latency and throughput, batched against unbatched.

Deploys the service (`serve.app`) on a local Ray cluster, then sends a bounded load of the same
kind of request (default: t2i with classifier-free guidance) at 1, 4 and 16 concurrent clients,
once with batching (`max_batch_size` 16) and once without (1). Each request has its own seed.
Finally a burst of malformed requests; the service must answer each with a 4xx and stay healthy.

    python benchmarks/serve_load.py --out runs/bench/serve_load.json
    python benchmarks/serve_load.py --model runs/demo/model --task at2i --steps 28 --out load.json

Without --model, a random `toy` transformer with the toy codecs is served (the codecs are built
into runs/toy/codecs first if missing; latency depends on sizes, not on training). The clients
run on the same machine as the service, so on a small machine they compete for its cores.

Writes, per mode and concurrency: requests, p50 / p99 latency (s), throughput (requests/s) and
the mean sampler batch; the batched / unbatched throughput ratio per concurrency; and the burst
result (status codes seen, health afterwards).
"""

import argparse
import json
import platform
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from omniflow.tasks import BUILTIN_TASKS
from serve.client import Client, ServiceError
from shapesworld import make_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", help="model directory (default: a random toy model with the toy codecs)")
    p.add_argument("--task", default="t2i", choices=sorted(BUILTIN_TASKS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--burst", type=int, default=200, help="malformed requests in the burst")
    return p.parse_args(argv)


def toy_model_dir(root: Path) -> Path:
    """A random toy transformer with the toy codecs, as a model directory."""
    import torch

    from omniflow.model_dir import save_model_dir
    from omniflow.presets import build_transformer
    from shapesworld.toy.codecs import build_toy_codecs, toy_codec_configs

    codecs_dir = Path("runs/toy/codecs")
    build_toy_codecs(codecs_dir)  # cached: returns at once when built
    torch.manual_seed(0)
    info = {"preset": "toy", "latent_shapes": {"image": [4, 8, 8], "text": [8, 32], "audio": [4, 32, 16]},
            "codecs": toy_codec_configs(codecs_dir)}
    return save_model_dir(build_transformer("toy"), root / "serve-model", extra=info)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_level(client: Client, request: dict, clients: int, n: int, seed0: int) -> dict:
    """n requests from `clients` threads; latency percentiles, throughput, mean sampler batch."""
    def one(seed: int) -> tuple[float, int]:
        start = time.perf_counter()
        result = client.generate(seed=seed, **request)
        return time.perf_counter() - start, result.batch_size

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(seed0 - clients, seed0)))  # warm-up, not counted
        start = time.perf_counter()
        done = list(pool.map(one, range(seed0, seed0 + n)))
        wall = time.perf_counter() - start
    latencies = np.array([d[0] for d in done])
    return {
        "clients": clients, "requests": n,
        "p50_s": round(float(np.percentile(latencies, 50)), 4), "p99_s": round(float(np.percentile(latencies, 99)), 4),
        "throughput_rps": round(n / wall, 3), "mean_batch": round(float(np.mean([d[1] for d in done])), 2),
    }


def burst(url: str, n: int) -> dict:
    """n malformed requests at once; the status codes, and whether the service is healthy after."""
    bodies = [b"{not json", b'{"task": "t2v"}', b'{"task": "i2t", "image": "AAAA"}', b'{"task": "t2i", "steps": -1}',
              b'{"task": "t2i", "text": "a", "num_outputs": 1000}', b"[]"]

    def send(i: int) -> int:
        request = urllib.request.Request(url + "/v1/generate", data=bodies[i % len(bodies)], method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(n)))
    client = Client(url)
    try:
        healthy = client.health() == {"status": "ok"} and client.generate("joint", steps=2, seed=0).image is not None
    except (ServiceError, OSError):
        healthy = False
    return {"requests": n, "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "all_4xx": all(400 <= s < 500 for s in statuses), "healthy_after": healthy}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ray import serve

    from pipelines.runtime import init_ray
    from serve.app import build_app

    model = Path(args.model) if args.model else toy_model_dir(args.out.parent)
    record = make_records(1, seed=0)[0]
    inputs = {m.value: record["caption" if m.value == "text" else m.value] for m in BUILTIN_TASKS[args.task].conditions}
    request = {"task": args.task, "steps": args.steps, "guidance": args.guidance if inputs else 1.0, **inputs}
    levels = [int(c) for c in args.concurrency.split(",")]

    init_ray()
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results: dict = {}
    for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        serve.run(build_app({"model": str(model), "max_batch_size": batch, "batch_wait_timeout_s": 0.02}),
                  name="omniflow", route_prefix="/")
        client = Client(url)
        results[mode] = []
        for clients in levels:
            level = load_level(client, request, clients, args.requests, seed0=1000 * clients)
            print(f"{mode:9s} {clients:2d} clients: p50 {level['p50_s']:.3f} s  p99 {level['p99_s']:.3f} s  "
                  f"{level['throughput_rps']:.2f} req/s  mean batch {level['mean_batch']}", flush=True)
            results[mode].append(level)
        if mode == "batched":
            results["burst"] = burst(url, args.burst)
            print(f"burst: {results['burst']}", flush=True)
        serve.delete("omniflow")
    serve.shutdown()

    ratios = {str(b["clients"]): round(b["throughput_rps"] / u["throughput_rps"], 3)
              for b, u in zip(results["batched"], results["unbatched"])}
    report = {
        "benchmark": "serve_load",
        "model": str(model), "request": {k: v for k, v in request.items() if k not in ("image", "audio")},
        "max_batch_size": args.max_batch_size,
        **results,
        "batched_over_unbatched_throughput": ratios,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"batched_over_unbatched_throughput": ratios, "burst": results["burst"]}, indent=2))
    return report


if __name__ == "__main__":
    main()
