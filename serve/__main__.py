"""Serve a model directory on this machine: a local Ray cluster, the service on 127.0.0.1.

    python -m serve --model runs/demo/model                  # http://127.0.0.1:8000
    python -m serve --model s3://bucket/models/omniflow --device cuda --dtype bfloat16 --port 9000

Then, e.g.:  python -m serve.client t2i --text "a small red circle" --out outputs/
On a cluster, use `serve run serve/config.yaml` or the RayService in infra/kuberay/.
"""

import argparse
import sys
import time

from omniflow.config import ConfigError, load_config
from serve.schema import ServeConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory from jobs.train / jobs.merge (local or s3://)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per sampler call; 1 turns batching off")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per generator replica")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="other ServeConfig fields, e.g. limits.max_steps=50 storage.endpoint_url=http://...")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = {"model": args.model, "device": args.device, "dtype": args.dtype,
                "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    try:
        config = load_config(ServeConfig, settings, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ray import serve

    from pipelines.runtime import init_ray
    from serve.app import Generator, application

    generator = Generator.options(num_replicas=args.replicas,
                                  ray_actor_options={"num_cpus": 1, "num_gpus": args.num_gpus})
    try:
        app = application(config, generator=generator)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray(log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="omniflow", route_prefix="/")
    print(f"serving {config.model} at http://{args.host}:{args.port}  (docs: /docs; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
