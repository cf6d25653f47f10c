"""Write the example images the README's first command scores: photos from scikit-image, each
pristine and with a few common distortions (blur, noise, heavy JPEG), 256 px on the long side.

    python examples/make_example_images.py               # rewrites examples/images
    python examples/make_example_images.py --output DIR  # elsewhere
"""

import argparse
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage import data

OUTPUT = Path(__file__).resolve().parent / "images"
PHOTOS = ("astronaut", "coffee", "chelsea")


def distortions(image: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 40, (image.height, image.width, 3))
    jpeg = BytesIO()
    image.save(jpeg, format="JPEG", quality=5)
    return {
        "pristine": image,
        "blur": image.filter(ImageFilter.GaussianBlur(4)),
        "noise": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
        "jpeg": Image.open(BytesIO(jpeg.getvalue())).convert("RGB"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: examples/images")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)())
        photo.thumbnail((256, 256), Image.Resampling.LANCZOS)
        for kind, image in distortions(photo, rng).items():
            image.save(args.output / f"{name}_{kind}.png")
    print(f"wrote {len(PHOTOS) * 4} images to {args.output}")


if __name__ == "__main__":
    main()
