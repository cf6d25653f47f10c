"""The HTTP API of the reward service, apart from Ray: limits, request parsing and authentication.

``POST /score`` takes a JSON body ``{"images": ["<base64 of a PNG, JPEG or WebP file>", ...]}``
(``Content-Type: application/json``) and answers ``{"scores": [...], "model": ..., "score_range":
[low, high], "batch_sizes": [...]}`` with one score per image in request order; ``batch_sizes[i]``
is the number of images in the forward pass that scored image ``i``. ``GET /healthz`` answers
``{"status": "ok"}`` (without authentication, for load balancers), ``GET /info`` describes the
model and the limits.

A refused request gets a 4xx status and ``{"error": "<what was wrong>", "type": "<kind>"}``:

====  ======================  ==================================================================
400   ``bad_request``         the body is not JSON of that shape, or an image is not base64
401   ``unauthorized``        a token is set and the request lacks ``Authorization: Bearer <it>``
404   ``not_found``           another path
405   ``method_not_allowed``  another method on a known path
413   ``body_too_large``      the body is over ``max_body_bytes``
413   ``too_many_images``     more than ``max_images_per_request`` images
413   ``decompression_bomb``  an image declares more than ``max_image_pixels`` pixels
415   ``unsupported_media``   the content type is not ``application/json``
422   ``not_an_image``        an image is not a complete PNG, JPEG or WebP file
422   ``unscorable``          the model refuses an image (e.g. a side under one vision patch)
====  ======================  ==================================================================

Nothing on the wire is ever unpickled: bodies are JSON, images are decoded by Pillow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass

TOKEN_ENVIRONMENT_VARIABLE = "QSCORER_SERVE_TOKEN"

STATUS_OF_KIND = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "too_many_images": 413,
    "decompression_bomb": 413,
    "unsupported_media": 415,
    "not_an_image": 422,
    "unscorable": 422,
}


@dataclass
class ServiceLimits:
    """What one request may carry.

    Attributes:
        max_images_per_request: images in one ``POST /score``.
        max_body_bytes: bytes of one request body (base64 makes images a third larger).
        max_image_pixels: width x height of one image, checked from its header before decoding.
    """

    max_images_per_request: int = 256
    max_body_bytes: int = 64 * 2**20
    max_image_pixels: int = 4096 * 4096

    def to_dict(self) -> dict:
        return asdict(self)


class RequestError(Exception):
    """A request the service refuses: ``kind`` is one of `STATUS_OF_KIND`, ``status`` its HTTP status."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind
        self.status = STATUS_OF_KIND[kind]

    def body(self) -> dict:
        return {"error": str(self), "type": self.kind}


def check_content(content_type: str | None, content_length: str | None, limits: ServiceLimits) -> None:
    """Refuse a ``POST /score`` from its headers alone: wrong content type, declared body too large."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(
            f"POST /score takes Content-Type application/json (a JSON body with base64 images), got "
            f"{content_type or 'none'!r}",
            "unsupported_media",
        )
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise _body_too_large(int(content_length), limits)


def _body_too_large(size: int | None, limits: ServiceLimits) -> RequestError:
    got = f"{size} bytes" if size is not None else "more"
    return RequestError(
        f"the body is {got}, over the limit of {limits.max_body_bytes} bytes: send fewer images per request",
        "body_too_large",
    )


async def read_body(chunks, limits: ServiceLimits) -> bytes:
    """Join the body ``chunks`` (an async iterator of bytes), refusing it as soon as it grows past
    ``limits.max_body_bytes`` (whatever Content-Length claimed)."""
    body, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _body_too_large(None, limits)
        body.append(chunk)
    return b"".join(body)


def parse_score_request(body: bytes, limits: ServiceLimits) -> list[bytes]:
    """The encoded image files of a ``POST /score`` body, in order; `RequestError` if it is not
    ``{"images": [base64 string, ...]}`` with 1..``max_images_per_request`` images."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not JSON ({err})", "bad_request") from err
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise RequestError('the body must be a JSON object {"images": [base64 strings]}', "bad_request")
    if not images:
        raise RequestError('"images" is empty: send at least one image', "bad_request")
    if len(images) > limits.max_images_per_request:
        raise RequestError(
            f"{len(images)} images in one request, over the limit of {limits.max_images_per_request}: split it",
            "too_many_images",
        )
    files = []
    for index, encoded in enumerate(images):
        if not isinstance(encoded, str):
            raise RequestError(f"images[{index}] is a {type(encoded).__name__}, not a base64 string", "bad_request")
        try:
            files.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"images[{index}] is not valid base64 ({err})", "bad_request") from err
    return files


def check_token(authorization: str | None, token: str | None) -> None:
    """Refuse a request whose ``Authorization`` header does not carry ``Bearer <token>`` (when a
    token is set). The tokens are compared as SHA-256 digests in constant time, so the time taken
    tells nothing about where they differ, nor about the token's length."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(given.strip()), _digest(token)):
        raise RequestError("missing or wrong token: send the header 'Authorization: Bearer <token>'", "unauthorized")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def encode_score_request(files: list[bytes]) -> bytes:
    """The ``POST /score`` body for encoded image files (the client's side of `parse_score_request`)."""
    return json.dumps({"images": [base64.b64encode(data).decode("ascii") for data in files]}).encode()
