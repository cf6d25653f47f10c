"""The reward service: a Ray Serve application that scores images sent over HTTP with a `QScorer`.

Each replica loads the scorer once. Requests are parsed and their images decoded as they come
(`qscorer_reward.serving.http_api`, `qscorer_reward.serving.images`); every image then joins a
queue that ``@serve.batch`` empties into forward passes of at most ``max_batch_size`` images,
whichever requests they came from. The forward pass runs in a worker thread, so the replica keeps
reading and decoding the next requests meanwhile. An image the model refuses fails only its own
request; a replica that dies is replaced by Ray Serve, and `RemoteQScorer` retries what it lost.

Build the application with `build_app` and run it with ``serve.run``, or use `run_service`
(what ``qscorer serve`` calls).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field

import torch

from qscorer_reward import __version__
from qscorer_reward.extras import missing_extra

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ModuleNotFoundError as err:
    raise missing_extra("serve", __name__) from err

from .http_api import RequestError, ServiceLimits, check_content, check_token, parse_score_request, read_body
from .images import ImageRejected, decode_image, score_images

DTYPES = ("float32", "bfloat16", "float16")
ROUTES = {"/healthz": "GET", "/info": "GET", "/score": "POST"}


@dataclass
class ServiceSettings:
    """What every replica of the service is built from.

    Attributes:
        model: checkpoint directory or hub id; ``None`` for the bundled default.
        dtype: backbone weight dtype, one of `DTYPES` (default: the checkpoint's).
        max_batch_size: most images per forward pass.
        batch_wait_timeout_ms: how long the first image of a batch waits for others to join it.
        token: when set, ``/info`` and ``/score`` need ``Authorization: Bearer <token>``.
        limits: what one request may carry.
    """

    model: str | None = None
    dtype: str | None = None
    max_batch_size: int = 32
    batch_wait_timeout_ms: float = 10.0
    token: str | None = field(default=None, repr=False)
    limits: ServiceLimits = field(default_factory=ServiceLimits)

    def __post_init__(self) -> None:
        if isinstance(self.limits, dict):
            self.limits = ServiceLimits(**self.limits)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_ms < 0:
            raise ValueError(f"batch_wait_timeout_ms must be >= 0, got {self.batch_wait_timeout_ms}")


@serve.deployment
class QScorerService:
    """One replica: a `QScorer` behind ``GET /healthz``, ``GET /info`` and ``POST /score``."""

    def __init__(self, settings: dict):
        import ray

        from qscorer_reward.scorer import QScorer

        self.settings = ServiceSettings(**settings)
        # As many torch threads as the CPUs Ray gave this replica; it hides all but its GPUs.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        dtype = getattr(torch, self.settings.dtype) if self.settings.dtype else None
        self.scorer = QScorer.from_pretrained(self.settings.model, device=device, dtype=dtype)
        self.score_batch.set_max_batch_size(self.settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_ms / 1000)
        config = self.scorer.config
        self.model_name = config.model_name or self.settings.model or "bundled default"
        self.info = {
            "model": self.model_name,
            "backbone": config.backbone_family,
            "base_model": config.base_model,
            "score_range": list(self.scorer.score_range),
            "lower_better": self.scorer.lower_better,
            "version": __version__,
            "checkpoint_version": config.version,
            "device": str(self.scorer.device),
            "dtype": str(self.scorer.dtype).removeprefix("torch."),
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_timeout_ms": self.settings.batch_wait_timeout_ms,
            **self.settings.limits.to_dict(),
        }

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except RequestError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def _route(self, request: Request) -> dict:
        root = request.scope.get("root_path", "")
        path = request.scope["path"].removeprefix(root).rstrip("/") or "/"
        if path not in ROUTES:
            known = ", ".join(f"{method} {route}" for route, method in ROUTES.items())
            raise RequestError(f"no such path {path!r}: the service has {known}", "not_found")
        if request.method != ROUTES[path]:
            raise RequestError(f"{path} takes {ROUTES[path]}, not {request.method}", "method_not_allowed")
        if path == "/healthz":
            return {"status": "ok"}
        check_token(request.headers.get("authorization"), self.settings.token)
        if path == "/info":
            return self.info
        return await self._score(request)

    async def _score(self, request: Request) -> dict:
        limits = self.settings.limits
        check_content(request.headers.get("content-type"), request.headers.get("content-length"), limits)
        files = parse_score_request(await read_body(request.stream(), limits), limits)
        images = await asyncio.to_thread(self._decode, files)
        results = await asyncio.gather(*(self.score_batch(image) for image in images))
        for index, (score, _) in enumerate(results):
            if isinstance(score, ValueError):  # scored alone, the scorer calls it images[0]
                message, name = str(score), f"images[{index}]"
                if message.startswith("images[0]"):
                    raise RequestError(name + message.removeprefix("images[0]"), "unscorable")
                raise RequestError(f"{name}: {message}", "unscorable")
        return {
            "scores": [score for score, _ in results],
            "model": self.model_name,
            "score_range": list(self.scorer.score_range),
            "batch_sizes": [size for _, size in results],
        }

    def _decode(self, files: list[bytes]) -> list[torch.Tensor]:
        pixels, budget = self.settings.limits.max_image_pixels, self.scorer.backbone.decode_pixel_budget
        try:
            return [decode_image(data, pixels, f"images[{index}]", budget) for index, data in enumerate(files)]
        except ImageRejected as err:
            raise RequestError(str(err), err.kind) from err

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, images: list[torch.Tensor]) -> list[tuple[float | ValueError, int]]:
        """Score one batch of decoded images (uint8 ``[3, H, W]``) in a worker thread; per image,
        its score (or the `ValueError` that refused it) and the batch's size."""
        results = await asyncio.to_thread(score_images, self.scorer, images)
        return [(result, len(images)) for result in results]


def build_app(
    settings: ServiceSettings,
    *,
    replicas: int = 1,
    num_cpus_per_replica: float = 1,
    num_gpus_per_replica: float = 0,
):
    """The Ray Serve application (``serve.run(build_app(...))``): ``replicas`` copies of the
    scorer, each with that many CPUs and GPUs (a replica with a GPU scores on it)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    # Enough requests in a replica at once to fill a batch even when each carries one image, and
    # the next batch while one runs; more wait in Serve's queue.
    ongoing = max(8, 2 * settings.max_batch_size)
    deployment = QScorerService.options(
        num_replicas=replicas,
        max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
    )
    return deployment.bind(asdict(settings))


def _replica_failure(name: str) -> str | None:
    """The last line of what Serve reports for the deployments of application ``name`` (the
    exception a replica's constructor raised), if any."""
    application = serve.status().applications.get(name)
    lines = [
        line.strip()
        for deployment in (application.deployments.values() if application else ())
        for line in deployment.message.splitlines()
        if line.strip()
    ]
    return lines[-1] if lines else None


def run_service(
    settings: ServiceSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    num_cpus_per_replica: float = 1,
    num_gpus_per_replica: float = 0,
    address: str | None = None,
    name: str = "qscorer",
    route_prefix: str = "/",
    detach: bool = False,
) -> int:
    """Start the service and serve until SIGINT or SIGTERM, then take it down; returns the exit status.

    Without ``address`` it starts a local Ray instance (no dashboard) and shuts it down at the end
    (``qscorer serve`` first sets `LOCAL_RAY_ENVIRONMENT`).
    With ``address`` (``ray://host:10001``, ``host:6379`` or ``auto``) it deploys onto that cluster
    and at the end deletes only its own application; with ``detach`` it returns at once and leaves
    the application running (``serve delete NAME`` removes it). If Serve already runs on the
    cluster, its HTTP host and port stand.
    """
    import ray

    started_ray = address is None
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(
            settings,
            replicas=replicas,
            num_cpus_per_replica=num_cpus_per_replica,
            num_gpus_per_replica=num_gpus_per_replica,
        )
        try:
            serve.run(app, name=name, route_prefix=route_prefix)
        except RuntimeError as err:  # a replica that cannot start: Serve gave up on it
            print(f"error: the service did not start: {_replica_failure(name) or err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C while the replicas load
            print("interrupted before the service was up", file=sys.stderr)
            return 130
        for signum in (signal.SIGINT, signal.SIGTERM):  # from now on a signal ends the service cleanly
            signal.signal(signum, lambda *_: stop.set())
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        print(f"serving {settings.model or 'the bundled default model'} at {url} ({replicas} replica(s))", flush=True)
        if detach:
            print(f"detached: the application {name!r} keeps running; `serve delete {name}` removes it", flush=True)
            return 0
        while not stop.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        if not detach:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete(name)
        ray.shutdown()
