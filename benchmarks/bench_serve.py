"""The reward service against in-process scoring of the same images, on this machine's CPU.

Model: the bundled default (`qscorer-tiny`, 224 x 224 pixel budget). Images: the example photos'
centre crops at 224 x 224, as PNG files (what a client sends). Measured in one run:

- in-process: ``scorer(images)`` on the decoded images, ``--batch`` per call, with ``--threads``
  torch threads; also with the PNG decoding included. Measured right before and right after each
  service measurement (the machine is shared and its speed drifts); each ratio uses their mean.
- the service (``qscorer serve`` as `build_app` builds it, on a local Ray instance, loopback):
  1, 8 and 32 concurrent clients (threads of this process, one kept-alive connection each), each
  sending requests of ``--images-per-request`` pre-encoded images back to back: images/s,
  request latency p50/p99, and the batch sizes the server formed (from the answers'
  ``batch_sizes``). Once with one replica of ``--threads`` threads, once with 2 replicas of half as
  many each (at least one).
- the bare per-request overhead: ``GET /healthz`` (proxy -> replica -> answer, no model) and a
  one-image ``POST /score`` from one client, one request at a time.
- what a `RemoteQScorer` adds on the client: PNG encoding of a uint8 tensor, ms per image.

Run from the repository root (about 4 minutes; ``--quick``: about 1)::

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

from qscorer_reward.serving import LOCAL_RAY_ENVIRONMENT  # noqa: E402

for _name, _value in LOCAL_RAY_ENVIRONMENT.items():  # before Ray is imported: one node, on loopback
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from bench_default_model import example_batch  # noqa: E402
from timing import interleaved_median_ms, machine_info  # noqa: E402

from qscorer_reward import QScorer  # noqa: E402
from qscorer_reward.serving.http_api import encode_score_request  # noqa: E402
from qscorer_reward.serving.images import decode_image, encode_png  # noqa: E402

HOST = "127.0.0.1"
TARGET_RATIO = 0.7


def in_process(scorer: QScorer, files: list[bytes], batch: int, repeats: int) -> dict:
    """images/s of ``scorer`` on ``batch`` decoded images per call, and with the decoding."""
    decoded = [decode_image(data, 2**30) for data in files[:batch]]

    def decode_and_score():
        return scorer([decode_image(data, 2**30) for data in files[:batch]])

    with torch.inference_mode():
        ms = interleaved_median_ms(
            {"decoded": lambda: scorer(decoded), "with_decoding": decode_and_score}, warmup=1, repeats=repeats
        )
    return {name: 1e3 * batch / value for name, value in ms.items()}


class Client(threading.Thread):
    """Sends ``requests`` POST /score requests, each one prebuilt body, one after another."""

    def __init__(self, port: int, body: bytes, requests: int, start: threading.Barrier):
        super().__init__(daemon=True)
        self.port, self.body, self.requests, self.start_barrier = port, body, requests, start
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self.failures = 0

    def run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=300)
        headers = {"Content-Type": "application/json"}
        self.start_barrier.wait()
        for _ in range(self.requests):
            started = time.perf_counter()
            connection.request("POST", "/score", body=self.body, headers=headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
            self.latencies.append(time.perf_counter() - started)
            if response.status != 200:
                self.failures += 1
                continue
            self.batch_sizes.extend(answer["batch_sizes"])
        connection.close()


def load(port: int, files: list[bytes], clients: int, images_per_request: int, total_images: int) -> dict:
    """Throughput, latency and formed batch sizes of ``clients`` concurrent clients."""
    requests = max(2, total_images // (clients * images_per_request))
    body = encode_score_request(files[:images_per_request])
    start = threading.Barrier(clients + 1)
    threads = [Client(port, body, requests, start) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for thread in threads for latency in thread.latencies)
    sizes = [size for thread in threads for size in thread.batch_sizes]
    done = len(latencies)
    return dict(
        clients=clients,
        images_per_request=images_per_request,
        requests=done,
        failures=sum(thread.failures for thread in threads),
        images_per_s=done * images_per_request / elapsed,
        requests_per_s=done / elapsed,
        latency_p50_ms=1e3 * latencies[len(latencies) // 2],
        latency_p99_ms=1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        # Per image, the size of the forward pass that scored it: the mean is image-weighted.
        batch_size_mean=statistics.mean(sizes),
        batch_size_max=max(sizes),
    )


def sequential_ms(port: int, method: str, path: str, body: bytes | None, count: int) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    headers = {"Content-Type": "application/json"} if body else {}
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        times.append(time.perf_counter() - started)
    connection.close()
    return {"p50_ms": 1e3 * statistics.median(times), "requests_per_s": count / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (a smoke run)")
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="max batch size, server and in-process (default 32)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="torch threads in-process and of one replica; 2 replicas get half each, at least 1 (default: all cores)",
    )  # fmt: skip
    parser.add_argument("--batch-wait-timeout-ms", type=float, default=10.0, help="the server's (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from qscorer_reward.serving.app import ServiceSettings, build_app

    threads = args.threads
    torch.set_num_threads(threads)
    total_images = 128 if args.quick else 768
    repeats = 2 if args.quick else 3
    files = [encode_png(image) for image in example_batch(max(args.batch, args.images_per_request), 224)]
    scorer = QScorer.from_pretrained()
    in_process(scorer, files, args.batch, 1)  # warm-up

    def measured(run) -> dict:
        """``run()``'s row, with in-process throughput measured right before and after it (the
        machine is shared: its speed drifts) and the ratios to their mean."""
        before = in_process(scorer, files, args.batch, repeats)
        row = run()
        after = in_process(scorer, files, args.batch, repeats)
        for name in before:
            row[f"in_process_{name}_images_per_s"] = [before[name], after[name]]
            row[f"ratio_to_in_process_{name}"] = row["images_per_s"] / ((before[name] + after[name]) / 2)
        return row

    ray.init(num_cpus=max(threads, 2), include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    settings = ServiceSettings(max_batch_size=args.batch, batch_wait_timeout_ms=args.batch_wait_timeout_ms)
    services = {}
    try:
        for replicas in (1, 2):
            app = build_app(settings, replicas=replicas, num_cpus_per_replica=max(1, threads // replicas))
            serve.run(app, name="bench", route_prefix="/")
            load(port, files, 4, args.images_per_request, 64)  # warm-up: connections, first batches
            services[f"{replicas}_replica"] = [
                measured(lambda n=n: load(port, files, n, args.images_per_request, total_images)) for n in (1, 8, 32)
            ]
            if replicas == 1:
                overhead = {
                    "healthz": sequential_ms(port, "GET", "/healthz", None, 50 if args.quick else 200),
                    "one_image_score": sequential_ms(
                        port, "POST", "/score", encode_score_request(files[:1]), 20 if args.quick else 100
                    ),
                }
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    pixels = example_batch(16, 224)
    encode_ms = 1e3 * min(timeit(lambda: [encode_png(image) for image in pixels]) for _ in range(3)) / len(pixels)
    target_row = services["1_replica"][-1]
    results = dict(
        machine=machine_info(),
        model=scorer.config.model_name,
        image_side=224,
        threads=threads,
        threads_per_replica={"1_replica": threads, "2_replica": max(1, threads // 2)},
        max_batch_size=args.batch,
        batch_wait_timeout_ms=args.batch_wait_timeout_ms,
        service=services,
        overhead=overhead,
        client_png_encode_ms_per_image=encode_ms,
        target_ratio=TARGET_RATIO,
        meets_target=target_row["ratio_to_in_process_decoded"] >= TARGET_RATIO,
    )
    for name, rows in services.items():
        for row in rows:
            low, high = sorted(row["in_process_decoded_images_per_s"])
            print(f"{name} {row['clients']:2d} clients x {row['images_per_request']} img: {row['images_per_s']:6.1f} "
                  f"images/s = {row['ratio_to_in_process_decoded']:.2f}x in-process ({low:.0f}-{high:.0f}/s; "
                  f"{row['ratio_to_in_process_with_decoding']:.2f}x with its PNG decoding), "
                  f"p50 {row['latency_p50_ms']:.0f} ms, p99 {row['latency_p99_ms']:.0f} ms, "
                  f"batch mean {row['batch_size_mean']:.1f} max {row['batch_size_max']}, "
                  f"failures {row['failures']}")  # fmt: skip
    healthz, one_image = overhead["healthz"], overhead["one_image_score"]
    print(f"bare request: GET /healthz {healthz['p50_ms']:.1f} ms p50 ({healthz['requests_per_s']:.0f}/s); "
          f"one-image POST /score {one_image['p50_ms']:.1f} ms p50")  # fmt: skip
    print(f"client PNG encoding: {encode_ms:.2f} ms/image")
    verdict = "met" if results["meets_target"] else "missed"
    print(f"target >= {TARGET_RATIO}x in-process at 32 clients x {args.images_per_request} images: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def timeit(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
