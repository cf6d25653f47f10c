"""Measuring tools shared by the benchmark scripts: the machine, wall-clock times, peak memory.

- `machine_info`: CPU, GPU (when one is used) and library versions, for the report.
- `interleaved_median_ms`: median wall time of several variants measured in alternating rounds.
- `peak_memory_bytes`: the most tensor memory a call holds on its device at once.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model, logical core count, torch threads, library versions, and the GPU when ``device``
    is a CUDA device."""
    import transformers

    cpu_model = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    info = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=properties.total_memory / 2**30,
            gpu_multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(
    variants: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device | str = "cpu",
    time_budget_s: float | None = None,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median wall time (ms) of each zero-argument callable, until its work on ``device`` is done.

    Every round runs all variants once, in an order reversed each round, so slow drifts of the
    machine (frequency, caches, other load) hit all variants alike. After ``warmup`` untimed
    rounds, runs ``repeats`` timed rounds, or fewer (at least one) once ``time_budget_s`` seconds
    have passed since the first timed round started. ``setup[name]``, where given, runs untimed
    before each call of that variant (to switch a model setting, say).
    """
    names = list(variants)
    setup = setup or {}

    def run(name: str) -> float:
        if name in setup:
            setup[name]()
        synchronize(device)
        start = time.perf_counter()
        variants[name]()
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in names:
            run(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(run(name))
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


class _NewTensorBytes(TorchDispatchMode):
    """Counts the bytes of the CPU tensor storages that the operators run under it allocate, and
    the most of them alive at once.

    A storage counts from the operator that returned it until it is freed (a weak reference to it
    tells). Outputs that share a storage with an input (views, in-place results) or with an
    output seen before are not new and do not count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _release(self, data_ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(data_ptr, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu"
        }
        for leaf in tree_leaves(output):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type != "cpu":
                continue
            storage = leaf.untyped_storage()
            data_ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or data_ptr in inputs or data_ptr in self._tracked:
                continue
            self._tracked[data_ptr] = weakref.ref(storage, lambda _, p=data_ptr, n=nbytes: self._release(p, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return output


def peak_memory_bytes(call: Callable[[], object], device: torch.device | str, resident_bytes: int = 0) -> int:
    """The most bytes of tensor memory held at once on ``device`` while ``call()`` runs, counting
    what was already allocated when it started.

    On CUDA: ``torch.cuda.max_memory_allocated`` over the call (everything allocated by torch on
    the device, weights and inputs included). On the CPU, which has no allocator statistics:
    ``resident_bytes`` (pass the bytes of the weights and inputs) plus the peak of the tensors the
    call's operators allocate, tracked per operator (so the call runs several times slower: do
    not time it at the same time). The result of ``call()`` is dropped before returning.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    counter = _NewTensorBytes()
    with counter:
        call()
    return resident_bytes + counter.peak


def tensor_bytes(*items: torch.nn.Module | torch.Tensor) -> int:
    """Bytes of the parameters and buffers of modules and of tensors (each storage counted once)."""
    storages: dict[int, int] = {}
    for item in items:
        tensors = [*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
