"""The reward service on a real Ray Serve instance on loopback: scores, batching, refused requests,
tokens, a killed replica, ``qscorer serve`` deploying onto the running cluster and shutting down,
and `RemoteQScorer` in every integration that takes a scorer (a real GRPOTrainer run included).

One Ray instance serves the whole module (two applications: an open one at ``/`` and one with a
token at ``/secure``). Ray binds to 127.0.0.1 only, and every request goes to 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from qscorer_reward.serving import LOCAL_RAY_ENVIRONMENT  # noqa: E402

for _name, _value in LOCAL_RAY_ENVIRONMENT.items():  # before Ray is imported: one node, on loopback
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from qscorer_reward import QScorer  # noqa: E402
from qscorer_reward.serving import RemoteQScorer, RequestRefused  # noqa: E402
from qscorer_reward.serving.app import ServiceSettings, build_app  # noqa: E402
from qscorer_reward.serving.http_api import ServiceLimits, encode_score_request  # noqa: E402
from qscorer_reward.testing import tiny_scorer  # noqa: E402

HOST = "127.0.0.1"
TOKEN = "s3cret-token"
SIDE = 56
LIMITS = ServiceLimits(max_images_per_request=4, max_body_bytes=200_000, max_image_pixels=512 * 512)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``(base url, model dir, in-process scorer of that dir)``; the module's Ray and Serve stop after it."""
    model_dir = tmp_path_factory.mktemp("serving") / "tiny"
    tiny_scorer(max_pixels=SIDE * SIDE).save_pretrained(model_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    assert ray.nodes()[0]["NodeManagerAddress"] == HOST
    port = _free_port()
    try:
        serve.start(http_options={"host": HOST, "port": port})
        settings = dict(model=str(model_dir), max_batch_size=8, batch_wait_timeout_ms=100, limits=LIMITS)
        resources = dict(num_cpus_per_replica=0.5)
        serve.run(build_app(ServiceSettings(**settings), **resources), name="open", route_prefix="/")
        secure = ServiceSettings(**settings, token=TOKEN)
        serve.run(build_app(secure, **resources), name="secure", route_prefix="/secure")
        yield f"http://{HOST}:{port}", model_dir, QScorer.from_pretrained(model_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
    with pytest.raises(ConnectionRefusedError):  # the proxy is gone with Serve
        _post(f"http://{HOST}:{port}", "/healthz", method="GET")


def _post(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method: str = "POST"):
    """``(status, JSON answer)`` of one request to ``url`` (loopback only)."""
    parts = url.split("://", 1)[1].split("/", 1)
    host, port = parts[0].split(":")
    assert host == HOST
    prefix = "/" + parts[1] if len(parts) > 1 else ""
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, prefix + path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _json(files: list[bytes]) -> dict:
    return {"body": encode_score_request(files), "headers": {"Content-Type": "application/json"}}


def _encoded(array: np.ndarray, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _random(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth(height: int, width: int) -> np.ndarray:
    """A colour gradient: a large image that encodes small."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([rows * 255 // height, columns * 255 // width, (rows + columns) % 256], -1).astype(np.uint8)


@functools.cache
def _client(url: str, token: str | None = None) -> RemoteQScorer:
    return RemoteQScorer(url, token=token, timeout=60, max_concurrency=4)


def _local_scores(scorer: QScorer, files: list[bytes]) -> torch.Tensor:
    """In-process scores of encoded files, decoded as `QScorer` decodes files."""
    with torch.inference_mode():
        return scorer([Image.open(io.BytesIO(data)) for data in files])


# ------------------------------------------------------------------------------ scores and API


def test_scores_equal_in_process_scores_for_formats_and_sizes(service, tmp_path):
    url, _, scorer = service
    files = [
        _encoded(_random((60, 80, 3)), "PNG"),
        _encoded(_random((97, 41, 3), 1), "JPEG", quality=80),
        _encoded(_random((64, 64, 3), 2), "WEBP", quality=70),
        _encoded(_random((50, 70), 3), "PNG"),  # grey
        _encoded(_random((45, 45, 4), 4), "PNG"),  # RGBA, composited onto white
        _encoded(_smooth(300, 200), "WEBP", lossless=True),  # resized to the pixel budget
    ]
    status, answer = _post(url, "/score", **_json(files[:4]))
    assert status == 200, answer
    status, rest = _post(url, "/score", **_json(files[4:]))
    assert status == 200, rest
    expected = _local_scores(scorer, files)
    assert answer["scores"] + rest["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert answer["score_range"] == [1.0, 5.0] and answer["model"] == str(service[1])
    assert all(1 <= size <= 8 for size in answer["batch_sizes"])

    # The client sends files as they are, and everything else as PNG.
    paths = []
    for index, data in enumerate(files[:3]):
        paths.append(tmp_path / f"image{index}.{['png', 'jpg', 'webp'][index]}")
        paths[-1].write_bytes(data)
    Image.open(io.BytesIO(files[0])).save(tmp_path / "image.bmp")  # not a wire format: sent as PNG
    pixels = torch.from_numpy(_random((2, 3, 40, 52), 6))
    images = [*paths, tmp_path / "image.bmp", pixels[0], pixels[1].float() / 255, Image.open(paths[1])]
    remote = _client(url)
    got = remote(images, batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (7,)
    with torch.inference_mode():
        assert got.tolist() == pytest.approx(scorer(images).tolist(), abs=1e-5)
    assert remote.score_range == (1.0, 5.0) and remote.lower_better is False


def test_a_rotated_jpeg_and_a_16_bit_png_score_as_in_process(service, tmp_path):
    """The service decodes as `QScorer` does (`preprocessing.decode_opened_image`): the EXIF
    orientation applied, 16-bit values divided by 65535 (not clipped to white)."""
    url, _, scorer = service
    stored = _smooth(60, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned by 90 degrees
    rotated = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(rotated, exif=exif, quality=95)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(stored[..., 0].astype(np.uint16) * 257).save(grey16)
    assert Image.open(grey16).mode == "I;16"
    status, answer = _post(url, "/score", **_json([rotated.read_bytes(), grey16.read_bytes()]))
    assert status == 200, answer
    with torch.inference_mode():
        expected = scorer([rotated, grey16])
        # what a decoder that skipped the orientation, or clipped 16-bit values, would have scored
        unturned = scorer([np.asarray(Image.open(rotated).convert("RGB"))])  # an array has no EXIF tag
        clipped = scorer([np.full((60, 90, 3), 255, dtype=np.uint8)])
    assert answer["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert abs(expected[0] - unturned[0]) > 1e-3 and abs(expected[1] - clipped[0]) > 1e-3
    assert _client(url)([rotated, grey16]).tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_health_and_info(service):
    url = service[0]
    assert _post(url, "/healthz", method="GET") == (200, {"status": "ok"})
    status, info = _post(url, "/info", method="GET")
    assert status == 200
    assert info["backbone"] == "qwen2_5_vl" and info["score_range"] == [1.0, 5.0] and info["lower_better"] is False
    assert info["max_batch_size"] == 8 and info["max_images_per_request"] == 4 and "version" in info


def test_concurrent_clients_are_batched_together(service):
    url, _, scorer = service
    files = [_encoded(_random((48, 48, 3), seed), "PNG") for seed in range(8)]
    start = threading.Barrier(len(files))

    def one_client(data):
        start.wait(timeout=30)
        return _post(url, "/score", **_json([data]))

    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(one_client, files))
    assert [status for status, _ in answers] == [200] * len(files)
    scores = [answer["scores"][0] for _, answer in answers]
    assert scores == pytest.approx(_local_scores(scorer, files).tolist(), abs=1e-5)
    sizes = [answer["batch_sizes"][0] for _, answer in answers]
    assert max(sizes) > 1, sizes  # requests of different clients shared a forward pass


def _bomb() -> bytes:
    """The start of a PNG declaring 10,000 x 10,000 pixels, with almost no pixel data: refused from
    the header it is a bomb (413); decoded, it would be a truncated file (422)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100)))


BAD_REQUESTS = {
    "not_json": (dict(body=b"images=1", headers={"Content-Type": "application/json"}), 400, "bad_request"),
    "no_images": (dict(body=b'{"pictures": []}', headers={"Content-Type": "application/json"}), 400, "bad_request"),
    "not_base64": (dict(body=b'{"images": ["***"]}', headers={"Content-Type": "application/json"}), 400, "bad_request"),
    "wrong_content_type": (dict(body=b"\x89PNG", headers={"Content-Type": "image/png"}), 415, "unsupported_media"),
    "too_many_images": (lambda: _json([_encoded(_random((20, 20, 3)), "PNG")] * 5), 413, "too_many_images"),
    "body_over_limit": (lambda: _json([_random((150_000,)).tobytes()]), 413, "body_too_large"),
    "not_an_image": (lambda: _json([b"hello, world"]), 422, "not_an_image"),
    "gif": (lambda: _json([_encoded(_random((30, 30)), "GIF")]), 422, "not_an_image"),
    "truncated_png": (lambda: _json([_encoded(_random((60, 60, 3)), "PNG")[:300]]), 422, "not_an_image"),
    "decompression_bomb": (lambda: _json([_bomb()]), 413, "decompression_bomb"),
    "too_small_to_score": (lambda: _json([_encoded(_random((8, 8, 3)), "PNG")]), 422, "unscorable"),
}


@pytest.mark.parametrize("kind", BAD_REQUESTS)
def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(service, kind):
    url, _, scorer = service
    request, expected_status, expected_type = BAD_REQUESTS[kind]
    status, answer = _post(url, "/score", **(request() if callable(request) else request))
    assert (status, answer["type"]) == (expected_status, expected_type), answer
    assert isinstance(answer["error"], str) and answer["error"]
    good = [_encoded(_random((40, 40, 3)), "PNG")]
    status, answer = _post(url, "/score", **_json(good))
    assert status == 200 and answer["scores"] == pytest.approx(_local_scores(scorer, good).tolist(), abs=1e-5)


def test_a_body_over_the_limit_is_refused_while_it_streams_in(service):
    chunks = (b"x" * 50_000 for _ in range(10))  # sent chunked: no Content-Length to refuse it by
    status, answer = _post(service[0], "/score", body=chunks, headers={"Content-Type": "application/json"})
    assert (status, answer["type"]) == (413, "body_too_large")


def test_wrong_paths_and_methods(service):
    assert _post(service[0], "/scores", b"{}")[0] == 404
    assert _post(service[0], "/score", method="GET")[0] == 405
    assert _post(service[0], "/healthz", b"{}")[0] == 405


def test_bad_images_fail_alone_in_a_shared_batch(service):
    url, _, scorer = service
    good = [_encoded(_random((44, 60, 3), seed), "PNG") for seed in range(5)]
    small = _encoded(_random((10, 60, 3)), "PNG")  # decodes, but the model refuses it in the batch
    requests = [[good[0]], [small], [good[1], good[2]], [good[3], small], [good[4]]]
    start = threading.Barrier(len(requests))

    def one_client(files):
        start.wait(timeout=30)
        return _post(url, "/score", **_json(files))

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(one_client, requests))
    assert [status for status, _ in answers] == [200, 422, 200, 422, 200]
    assert answers[3][1]["error"].startswith("images[1] is 10x60")
    expected = _local_scores(scorer, good).tolist()
    got = answers[0][1]["scores"] + answers[2][1]["scores"] + answers[4][1]["scores"]
    assert got == pytest.approx([expected[0], expected[1], expected[2], expected[4]], abs=1e-5)


def test_the_client_reports_refusals_naming_the_images(service):
    remote = _client(service[0])
    with pytest.raises(RequestRefused, match=r"refused images\[2:3\]: HTTP 422: images\[0\] is 8x8") as caught:
        remote([torch.rand(3, 30, 30), torch.rand(3, 30, 30), torch.rand(3, 8, 8)], batch_size=2)
    assert caught.value.status == 422 and caught.value.kind == "unscorable"
    with pytest.raises(ValueError, match=r"images\[1\] has values in .*outside the declared input_range"):
        remote([torch.rand(3, 30, 30), torch.rand(3, 30, 30) * 255])
    with pytest.raises(TypeError, match="without gradients"):
        remote(torch.rand(1, 3, 30, 30, requires_grad=True))
    with pytest.raises(ValueError, match="empty batch"):
        remote([])


# ------------------------------------------------------------------------------ tokens


def test_a_set_token_is_required(service):
    url = service[0] + "/secure"
    files = [_encoded(_random((40, 40, 3)), "PNG")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, answer = _post(
            url, "/score", encode_score_request(files), {"Content-Type": "application/json", **headers}
        )
        assert (status, answer["type"]) == (401, "unauthorized")
        assert _post(url, "/info", headers=headers, method="GET")[0] == 401
    assert _post(url, "/healthz", method="GET")[0] == 200  # for load balancers
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    assert _post(url, "/score", encode_score_request(files), headers)[0] == 200
    with pytest.raises(PermissionError, match="401"):
        RemoteQScorer(url, token="wrong")
    assert _client(url, TOKEN)(files_as_tensor(files)).shape == (1,)
    assert _post(service[0], "/score", **_json(files))[0] == 200  # the open application needs none


def files_as_tensor(files: list[bytes]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1) for data in files])


# ------------------------------------------------------------------------------ failures


def _pids(prefix: str) -> list[int]:
    """The process ids of the Serve actors whose names start with ``prefix``."""
    names = [
        actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"].startswith(prefix)
    ]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    return [ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30) for handle in handles]


def test_killed_replica_and_proxy_are_replaced_and_every_request_is_answered_once(service, caplog):
    url, _, scorer = service
    (replica,) = _pids("SERVE_REPLICA::open#")
    (proxy,) = _pids("SERVE_PROXY_ACTOR")
    batches = [torch.from_numpy(_random((2, 3, 40, 48), seed)) for seed in range(24)]
    with torch.inference_mode():
        expected = [scorer(batch).tolist() for batch in batches]
    remote = RemoteQScorer(url, timeout=30, max_concurrency=4, retry_for_s=120, backoff_s=0.2)
    answers: list[tuple[int, list[float]]] = []
    first_answer = threading.Event()

    def request(index):
        scores = remote(batches[index]).tolist()
        answers.append((index, scores))
        first_answer.set()

    caplog.set_level(logging.WARNING, logger="qscorer_reward.serving.client")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, index) for index in range(len(batches))]
        assert first_answer.wait(timeout=60)
        # Mid-load: requests are being scored, queued in the proxy, and on the way.
        os.kill(replica, signal.SIGKILL)  # Serve re-sends the replica's requests to its successor
        os.kill(proxy, signal.SIGKILL)  # connections drop until Serve restarts it: the client retries
        for future in futures:
            future.result(timeout=240)
    remote.close()
    indices = [index for index, _ in answers]
    assert sorted(indices) == list(range(len(batches)))  # every request answered, none twice
    for index, scores in answers:
        assert scores == pytest.approx(expected[index], abs=1e-5)
    assert any("retry" in record.getMessage() for record in caplog.records)
    assert _pids("SERVE_REPLICA::open#") not in ([], [replica])
    assert _pids("SERVE_PROXY_ACTOR") not in ([], [proxy])
    assert _post(url, "/healthz", method="GET")[0] == 200


# ------------------------------------------------------------------------------ the command


def test_qscorer_serve_deploys_onto_the_running_cluster_and_shuts_down_cleanly(service, tmp_path):
    url, model_dir, scorer = service
    address = ray.get_runtime_context().gcs_address
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "qscorer_reward.cli", "serve", "--model", str(model_dir), "--address", address,
               "--name", "cli", "--route-prefix", "/cli", "--port", port, "--num-cpus-per-replica", "0.5",
               "--token", TOKEN]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as stream:
        server = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "serving" not in log.read_text() or _post(url, "/cli/healthz", method="GET")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        pixels = torch.from_numpy(_random((2, 3, 40, 40)))
        with RemoteQScorer(url + "/cli", token=TOKEN) as remote, torch.inference_mode():
            assert remote(pixels).tolist() == pytest.approx(scorer(pixels).tolist(), abs=1e-5)
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    output = log.read_text()
    assert server.returncode == 0, output[-3000:]
    assert f"at http://127.0.0.1:{port}/cli" in output
    assert _post(url, "/cli/healthz", method="GET")[0] == 404  # its application is gone ...
    assert _post(url, "/healthz", method="GET")[0] == 200  # ... and only its own


def test_qscorer_serve_reports_a_model_that_cannot_load_in_one_line(service, tmp_path):
    command = [sys.executable, "-m", "qscorer_reward.cli", "serve", "--model", str(tmp_path / "missing"),
               "--address", ray.get_runtime_context().gcs_address, "--name", "broken", "--route-prefix", "/broken",
               "--num-cpus-per-replica", "0.5"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"error: the service did not start: FileNotFoundError: {tmp_path / 'missing'}: no such checkpoint" in (
        result.stderr
    )
    assert _post(service[0], "/broken/healthz", method="GET")[0] == 404
    assert _post(service[0], "/healthz", method="GET")[0] == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--replicas", "0"], "argument --replicas: must be >= 1, got '0'"),
        (["serve", "--detach"], "--detach needs --address"),
        (["score", "x", "--actors", "2"], "--address and --actors go with --engine ray"),
        (["score", "x", "--engine", "ray", "--actors", "0"], "argument --actors: must be >= 1, got '0'"),
        (["score", "x", "--engine", "ray", "--device", "cuda"], "--device goes with the default engine"),
    ],
)
def test_refused_options(args, message, capsys):
    from qscorer_reward.cli import main

    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ integrations


def _as_sent(images: torch.Tensor) -> torch.Tensor:
    """Float pixels as the client sends them: rounded to 8 bits."""
    return images.mul(255).round().div(255)


def test_reward_function_and_ddpo_protocol_take_the_remote_scorer(service):
    from qscorer_reward.integrations.ddpo import AsyncQScorerDDPOReward
    from qscorer_reward.integrations.trl import QScorerRewardFunc

    url, _, scorer = service
    remote = _client(url)
    pixels = torch.rand(6, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = scorer(_as_sent(pixels))
    rewards = QScorerRewardFunc(remote, normalize="unit", batch_size=2)(["p"] * 6, ["c"] * 6, image=list(pixels))
    assert rewards == pytest.approx(((expected - 1) / 4).tolist(), abs=1e-5)

    with ThreadPoolExecutor(2) as executor, AsyncQScorerDDPOReward(remote, executor=executor) as reward_fn:
        futures = [reward_fn(pixels[:3], ["a"] * 3), reward_fn(pixels[3:], ["b"] * 3)]
        results = [future.result(timeout=60) for future in futures]
    assert torch.cat([rewards for rewards, _ in results]).tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_diffusers_selection_and_gate_take_the_remote_scorer(service):
    from qscorer_reward.integrations.diffusers import QualityGate, best_of_n, filter_images
    from qscorer_reward.testing.pipelines import tiny_call_kwargs, tiny_pipeline

    url, _, scorer = service
    remote = _client(url)
    pipe = tiny_pipeline("sd")
    kwargs = tiny_call_kwargs("sd")
    best = best_of_n(pipe, "a red car", 3, remote, top_k=3, output_type="pt", **kwargs)
    with torch.inference_mode():
        expected = scorer(_as_sent(torch.stack(best.images[0])))
    assert best.scores[0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert best.scores[0].tolist() == sorted(best.all_scores[0].tolist(), reverse=True)

    images = torch.stack(best.images[0])
    threshold = float(expected.median())
    kept = filter_images(images, remote, threshold)
    assert kept.indices.tolist() == torch.nonzero(expected >= threshold).flatten().tolist()

    gate = QualityGate(remote, threshold=threshold, gate_step_index=2)
    pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), callback_on_step_end=gate, **kwargs)
    with torch.inference_mode():
        assert gate.scores.tolist() == pytest.approx(scorer(_as_sent(gate.previews)).tolist(), abs=1e-5)


def test_gradient_users_refuse_the_remote_scorer(service):
    from qscorer_reward.integrations.diffusers import QScorerGuidance
    from qscorer_reward.integrations.diffusers.reward_finetune import RewardFinetuneConfig, RewardFinetuner
    from qscorer_reward.testing.pipelines import tiny_pipeline

    remote = _client(service[0])
    with pytest.raises(TypeError, match="QScorerGuidance needs the gradient .* RemoteQScorer gives scores without"):
        QScorerGuidance(remote)
    config = RewardFinetuneConfig(train_prompts=["a cat"], mixed_precision="no", num_inference_steps=2)
    for method in ("draft", "refl"):
        config.method = method
        with pytest.raises(TypeError, match=rf"reward fine-tuning \({method}\) needs the gradient"):
            RewardFinetuner(tiny_pipeline("sd"), remote, config)


def test_grpo_trainer_step_takes_its_reward_from_the_service(service, tmp_path):
    from datasets import Dataset
    from PIL import ImageDraw
    from trl import GRPOConfig, GRPOTrainer

    from qscorer_reward.integrations.trl import QScorerRewardFunc
    from qscorer_reward.testing.policies import tiny_policy

    url, _, scorer = service
    rendered = []

    def render(prompts, completions):
        images = []
        for text in completions:
            image = Image.new("RGB", (SIDE, SIDE), "white")
            ImageDraw.Draw(image).text((2, SIDE // 3), text, fill="black")
            images.append(image)
        rendered.append(images)
        return images

    policy, tokenizer = tiny_policy()
    before = [param.detach().clone() for param in policy.parameters()]
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
        max_steps=1, logging_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False,
        activation_checkpointing=False, save_strategy="no", seed=0, beta=0.0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=QScorerRewardFunc(_client(url), render_fn=render),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a photo of", "a painting of"]}),
        processing_class=tokenizer,
    )
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "rewards/qscorer/mean" in entry]
    with torch.inference_mode():
        scores = scorer(rendered[0])  # PNG on the wire is lossless: the same pixels
    assert entry["rewards/qscorer/mean"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert trainer.state.global_step == 1
    assert any(not torch.equal(old, new) for old, new in zip(before, policy.parameters()))
