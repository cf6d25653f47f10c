"""`RemoteQScorer`: the reward service behind the call of a `QScorer`, for use without gradients.

Only the standard library talks to the server (``http.client``, one kept-alive connection per
worker thread), so the client needs neither Ray nor an HTTP package.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qscorer_reward.preprocessing import ImageInput, load_image, to_unit_pixels

from .http_api import TOKEN_ENVIRONMENT_VARIABLE, encode_score_request
from .images import encode_png

logger = logging.getLogger(__name__)

# Statuses worth another try: a replica that died (500), a proxy without a live replica yet
# (502, 503) or one that gave up waiting (504). Scoring is idempotent, so a retry is safe.
RETRIED_STATUSES = frozenset({500, 502, 503, 504})
MAX_BACKOFF_S = 5.0

# File signatures of the formats the service decodes; other files are converted to PNG first.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


class RequestRefused(ValueError):
    """The service refused a request (a 4xx): ``status`` and ``kind`` are its HTTP status and its
    error type (see `qscorer_reward.serving.http_api`)."""

    def __init__(self, message: str, status: int, kind: str | None):
        super().__init__(message)
        self.status = status
        self.kind = kind


class RemoteQScorer:
    """Score images on a running ``qscorer serve``, with the call of `QScorer`::

        scorer = RemoteQScorer("http://127.0.0.1:8000", token=None, timeout=60)
        scores = scorer(images)        # [B] float32 on the CPU, within scorer.score_range
        scores = await scorer.score_async(images)

    It takes what `QScorer` takes: a float tensor ``[B, 3, H, W]`` / ``[3, H, W]`` in ``input_range``,
    uint8 tensors, PIL images, paths, numpy arrays or a list mixing them. Files of the formats the
    service decodes (PNG, JPEG, WebP) are sent as they are, so their scores equal local scores of the
    same files; everything else is sent as 8-bit PNG, so float pixels are rounded to 1/255 first
    (the score is that of the image saved as a PNG). The images of a call go out in requests of at
    most ``batch_size`` images (default: the server's ``max_batch_size``), up to ``max_concurrency``
    at once, and the server batches them with other clients' requests.

    It has no gradients (``differentiable`` is false): integrations that need them
    (`QScorerGuidance`, DRaFT/ReFL fine-tuning) refuse it, and a tensor that requires grad is refused
    while grad mode is on. Everything that only reads scores takes it in place of a `QScorer`:
    `QScorerRewardFunc`, the DDPO reward protocol, `best_of_n`, `filter_images`, `QualityGate`.

    Failures: a refused request (4xx) raises `RequestRefused` (a `ValueError`) at once, a missing
    or wrong token (401) `PermissionError`. Lost connections, timeouts and 5xx answers (a replica
    that died, a proxy restarting) are retried with exponential backoff from ``backoff_s`` (with
    jitter, at most 5 s apart) for up to ``retry_for_s`` seconds, then raise `ConnectionError`. Each
    retry is logged as a warning of this module's logger.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8000`` (with its route prefix, if any).
        token: the bearer token; default: the ``QSCORER_SERVE_TOKEN`` environment variable, if set.
        timeout: seconds to wait for one answer.
        max_concurrency: requests in flight at once (threads of this client).
        retry_for_s: how long to keep retrying a request after its first attempt.
        backoff_s: the first wait before a retry.

    The constructor asks the service for ``/info`` (model, ``score_range``, limits), so a wrong URL
    or token fails here.
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        *,
        max_concurrency: int = 8,
        retry_for_s: float = 60.0,
        backoff_s: float = 0.25,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/prefix], got {url!r}")
        if max_concurrency < 1 or retry_for_s < 0 or timeout <= 0:
            raise ValueError("need max_concurrency >= 1, retry_for_s >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self._parts = parts
        self.token = token if token is not None else os.environ.get(TOKEN_ENVIRONMENT_VARIABLE)
        self.timeout = timeout
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="qscorer-remote")
        self.info: dict = self._request("GET", "/info")
        self.score_range: tuple[float, float] = tuple(self.info["score_range"])
        self.lower_better: bool = self.info["lower_better"]
        self.model_name: str = self.info["model"]

    def __repr__(self) -> str:
        return f"RemoteQScorer({self.url!r}, model={self.model_name!r})"

    @property
    def device(self) -> torch.device:
        """Where the scores come back: the CPU."""
        return torch.device("cpu")

    # ------------------------------------------------------------------ scoring

    def __call__(
        self, images: ImageInput, *, input_range: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None
    ) -> torch.Tensor:
        """Scores ``[B]`` float32 on the CPU, in input order (see the class docstring)."""
        chunks = self._plan(images, batch_size)
        futures = [self._executor.submit(self._score_chunk, items, offset, input_range) for offset, items in chunks]
        return torch.tensor([score for future in futures for score in future.result()], dtype=torch.float32)

    async def score_async(
        self, images: ImageInput, *, input_range: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None
    ) -> torch.Tensor:
        """`__call__` as a coroutine: the requests run in this client's threads while the event loop goes on."""
        loop = asyncio.get_running_loop()
        chunks = self._plan(images, batch_size)
        requests = [
            loop.run_in_executor(self._executor, self._score_chunk, items, offset, input_range)
            for offset, items in chunks
        ]
        results = await asyncio.gather(*requests)
        return torch.tensor([score for scores in results for score in scores], dtype=torch.float32)

    def _plan(self, images: ImageInput, batch_size: int | None) -> list[tuple[int, list]]:
        """``(offset, items)`` per request: the images split into runs of at most ``batch_size``."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4) or (
            isinstance(images, Sequence) and not isinstance(images, str)
        ):
            items = list(images)
        elif isinstance(images, (torch.Tensor, np.ndarray, Image.Image, str, os.PathLike)):
            items = [images]
        else:
            raise TypeError(
                f"images must be a tensor, numpy array, PIL image, path or a list of them, got {type(images).__name__}"
            )
        if not items:
            raise ValueError("empty batch: no images given")
        if torch.is_grad_enabled() and any(isinstance(item, torch.Tensor) and item.requires_grad for item in items):
            raise TypeError(
                "RemoteQScorer gives scores without gradients (they are computed on the server), but these images "
                "require grad: score them under torch.no_grad(), or use an in-process QScorer for gradients"
            )
        size = min(batch_size or self.info["max_batch_size"], self.info["max_images_per_request"])
        return [(start, items[start : start + size]) for start in range(0, len(items), size)]

    def _score_chunk(self, items: list, offset: int, input_range: tuple[float, float]) -> list[float]:
        files = [self._encode(item, offset + index, input_range) for index, item in enumerate(items)]
        try:
            return self._request("POST", "/score", encode_score_request(files))["scores"]
        except RequestRefused as err:
            where = f"images[{offset}:{offset + len(items)}]"
            raise type(err)(f"the service refused {where}: {err}", err.status, err.kind) from None

    def _encode(self, item, index: int, input_range: tuple[float, float]) -> bytes:
        """One image as the bytes of a PNG, JPEG or WebP file."""
        name = f"images[{index}]"
        if isinstance(item, (str, os.PathLike)):
            try:
                data = Path(item).read_bytes()
            except OSError as err:
                raise ValueError(f"{name} ({item}): cannot read the file ({err})") from err
            if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
                return data
            pixels = load_image(item, self.info["max_image_pixels"])
        else:
            try:
                image = item.detach() if isinstance(item, torch.Tensor) else item
                unit = to_unit_pixels([image], input_range, "cpu")[0]
            except (TypeError, ValueError) as err:
                raise type(err)(str(err).replace("images[0]", name, 1)) from None
            pixels = unit.mul(255).round_().to(torch.uint8)
        return encode_png(pixels)

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict:
        """One request, retried as the class docstring says; the JSON answer."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = self._parts.path.rstrip("/") + path
        deadline = time.monotonic() + self.retry_for_s
        attempt, problem = 0, ""
        while True:
            if attempt:
                wait = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
                if time.monotonic() + wait > deadline:
                    raise ConnectionError(
                        f"{self.url}{path}: no answer in {attempt} attempts within {self.retry_for_s:g} s "
                        f"(last: {problem})"
                    )
                logger.warning("%s %s%s: %s; retry %d in %.2f s", method, self.url, path, problem, attempt, wait)
                time.sleep(wait)
            attempt += 1
            connection = self._connection()
            try:
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut off
                self._drop_connection()
                problem = f"{type(err).__name__}: {err}"
                continue
            if response.will_close:
                self._drop_connection()
            if response.status < 300:
                return json.loads(data)
            if response.status not in RETRIED_STATUSES:
                raise _refusal(response.status, data)
            problem = f"HTTP {response.status}: {data[:300].decode(errors='replace')}"

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            connection = kind(self._parts.hostname, self._parts.port, timeout=self.timeout)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _drop_connection(self) -> None:
        connection = self._local.__dict__.pop("connection", None)
        if connection is not None:
            connection.close()
            with self._lock:
                self._connections.remove(connection)

    def close(self) -> None:
        """Stop this client's threads and close its connections."""
        self._executor.shutdown(wait=True)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def __enter__(self) -> RemoteQScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _refusal(status: int, data: bytes) -> Exception:
    try:
        answer = json.loads(data)
        message, kind = answer["error"], answer.get("type")
    except (ValueError, KeyError, TypeError):
        message, kind = data[:300].decode(errors="replace") or "no details", None
    if status == 401:
        return PermissionError(f"HTTP 401: {message}")
    return RequestRefused(f"HTTP {status}: {message}", status, kind)
