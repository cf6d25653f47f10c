"""``qscorer serve``: the reward service, ``POST /score`` over HTTP on Ray Serve (see
`qscorer_reward.serving.app`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qscorer_reward.config import DTYPES

from .common import add_command, positive_int


def add_serve_command(commands) -> None:
    serve = add_command(commands, "serve", "run the reward service: POST /score over HTTP (Ray Serve)")
    serve.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    serve.add_argument(
        "--dtype", choices=DTYPES, default=None, help="backbone weight dtype (default: as the checkpoint is stored)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--replicas", type=positive_int, default=1, help="copies of the model (default: 1)")
    serve.add_argument(
        "--num-cpus-per-replica", type=float, default=1, help="CPUs per replica, also its torch threads (default: 1)"
    )
    serve.add_argument(
        "--num-gpus-per-replica", type=float, default=0, help="GPUs per replica; 1 scores each on a GPU (default: 0)"
    )
    serve.add_argument(
        "--max-batch-size", type=positive_int, default=32, help="most images per forward pass (default: 32)"
    )
    serve.add_argument(
        "--batch-wait-timeout-ms", type=float, default=10.0, help="how long a batch waits to fill, ms (default: 10)"
    )
    serve.add_argument(
        "--max-images-per-request", type=positive_int, default=256, help="most images in one request (default: 256)"
    )
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MiB (default: 64)")
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest image, checked from its header before decoding (default: 16777216)",
    )
    serve.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default: none; better: set QSCORER_SERVE_TOKEN)",
    )
    serve.add_argument("--address", default=None, help="deploy onto this Ray cluster (default: start a local one)")
    serve.add_argument("--name", default="qscorer", help="the Serve application's name (default: qscorer)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the service (default: /)")
    serve.add_argument(
        "--detach", action="store_true", help="with --address: deploy and return, leaving it running (default: off)"
    )
    serve.set_defaults(run=_serve_command, check=_check_serve_options)


def _check_serve_options(args: argparse.Namespace) -> str | None:
    """Why the options cannot go together (a usage error), or ``None``."""
    if args.detach and not args.address:
        return "--detach needs --address: a local Ray instance ends with the command"
    return None


def _serve_command(args: argparse.Namespace) -> int:
    from qscorer_reward.serving import prepare_ray_environment

    prepare_ray_environment(args.address)  # before Ray is imported
    from qscorer_reward.serving.app import ServiceSettings, run_service
    from qscorer_reward.serving.http_api import TOKEN_ENVIRONMENT_VARIABLE, ServiceLimits

    model = args.model
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # the replicas' working folder is not ours
    settings = ServiceSettings(
        model=model,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_ms=args.batch_wait_timeout_ms,
        token=args.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None,
        limits=ServiceLimits(
            max_images_per_request=args.max_images_per_request,
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_image_pixels=args.max_image_pixels,
        ),
    )
    return run_service(
        settings, host=args.host, port=args.port, replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica, num_gpus_per_replica=args.num_gpus_per_replica,
        address=args.address, name=args.name, route_prefix=args.route_prefix, detach=args.detach,
    )  # fmt: skip
