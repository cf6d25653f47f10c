"""Peak memory of reading one large image file for scoring: reduced right after decoding (what
``QScorer`` and ``qscorer score`` do) against decoded whole and converted to float pixels (what they
did before).

The input is a PNG of SIDE x SIDE pixels (default 9400, the case of issue 21: 86 KB on disk,
265 MB decoded), a smooth colour gradient. Each variant runs in a fresh Python process that imports
torch and the package, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), reads the
file and reports ``VmHWM - VmRSS before``: the memory the read itself took, in MB.

- ``reduced``: ``load_image(path, reduce_to_pixels=budget)`` with the bundled model's budget
  (``scorer.backbone.decode_pixel_budget``, 4 x 224 x 224), then float pixels of that.
- ``full``: ``load_image(path)`` then float pixels of the whole image (as ``to_unit_pixels`` makes
  them), the path before this change.

Linux only (``/proc``). Run from the repository root::

    .venv/bin/python benchmarks/bench_decode_memory.py [--side 9400] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PROBE = """
import json, sys, time
import torch
from qscorer_reward.preprocessing import load_image

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

path, budget = sys.argv[1], int(sys.argv[2])
with open("/proc/self/clear_refs", "w") as stream:
    stream.write("5")  # peak RSS := current RSS
before = status("VmRSS")
started = time.perf_counter()
pixels = load_image(path, reduce_to_pixels=budget or None).float() / 255
seconds = time.perf_counter() - started
print(json.dumps({"peak_mb": (status("VmHWM") - before) / 2**20, "seconds": seconds,
                  "pixels_shape": list(pixels.shape)}))
"""


def gradient_png(side: int, path: Path) -> Path:
    """A smooth RGB gradient, built row band by row band (never the whole image as float)."""
    image = Image.new("RGB", (side, side))
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    band = 512
    for top in range(0, side, band):
        rows = np.arange(top, min(top + band, side), dtype=np.float32)[:, None] * (255.0 / side)
        block = np.stack(np.broadcast_arrays(ramp[None, :], rows, (ramp[None, :] + rows) / 2), axis=-1)
        image.paste(Image.fromarray(block.astype(np.uint8)), (0, top))
    image.save(path, compress_level=9)
    return path


def measure(path: Path, budget: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(budget)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=9400, help="image side in pixels (default: 9400)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from qscorer_reward import QScorer

    budget = QScorer.from_pretrained().backbone.decode_pixel_budget
    with tempfile.TemporaryDirectory() as folder:
        path = gradient_png(args.side, Path(folder) / "large.png")
        results = {
            "side": args.side,
            "file_kb": path.stat().st_size / 1024,
            "decode_pixel_budget": budget,
            "reduced": measure(path, budget),
            "full": measure(path, 0),
        }
    results["peak_ratio_full_over_reduced"] = results["full"]["peak_mb"] / results["reduced"]["peak_mb"]
    for name in ("reduced", "full"):
        row = results[name]
        print(f"{name:>8}: peak {row['peak_mb']:8.1f} MB, {row['seconds']:.2f} s, pixels {row['pixels_shape']}")
    ratio = results["peak_ratio_full_over_reduced"]
    print(f"file {results['file_kb']:.0f} KB; full / reduced peak memory: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
