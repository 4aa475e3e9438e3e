"""Make thumbnails of a folder of pictures; they come back as extra files.

Needs Pillow (pip install pillow). Run it with no server (it starts an embedded one):
    python examples/thumbnails.py [FOLDER]
or on a named server: DCPROTO_USER=home python examples/thumbnails.py [FOLDER]

Without a FOLDER it first draws a few sample pictures into examples/sample_pictures/. Each item
carries its picture's bytes, so a worker on another machine needs nothing but the item. A task
writes its thumbnail into ADDITIONAL_RESULTS; the creator receives it under
results/thumbnails/additional_results/. Only workers that can import PIL get the tasks.
"""

import io
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

from dcproto import ADDITIONAL_RESULTS, Distribute

SIZE = (128, 128)
PICTURES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def sample_pictures(folder):
    """A few pictures Pillow can draw by itself: fractals and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        size = (800 + 40 * i, 600)
        extent = (-2.0 + 0.05 * i, -1.2, 1.0, 1.2)
        fractal = ImageOps.equalize(Image.effect_mandelbrot(size, extent, 64 + 8 * i))
        ImageOps.colorize(fractal, "midnightblue", "gold", "tomato").save(
            folder / f"mandelbrot-{i:02}.png"
        )
    for i in range(4):
        Image.effect_noise((1024, 768), 20 + 10 * i).save(folder / f"noise-{i}.png")


def picture_folder():
    """The folder named on the command line, or the sample pictures (drawn if missing)."""
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    folder = Path(__file__).parent / "sample_pictures"
    if not folder.is_dir():
        sample_pictures(folder)
    return folder


def pictures(folder):
    """(name, bytes) of each picture in ``folder``."""
    return [
        (path.name, path.read_bytes())
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in PICTURES
    ]


@Distribute(
    user_name=os.environ.get("DCPROTO_USER"),
    iterator=lambda: pictures(picture_folder()),
    task_size=2,
    results_path="results/thumbnails",
    modules=["PIL"],
)
class Thumbnails:
    @staticmethod
    def parallel_func(item):
        """Write the item's thumbnail as a PNG extra file; return the picture's original size."""
        name, data = item
        with Image.open(io.BytesIO(data)) as picture:
            original = picture.size
            picture.thumbnail(SIZE)
            picture.save(os.path.join(ADDITIONAL_RESULTS, Path(name).stem + ".png"))
        return original


if __name__ == "__main__":
    started = time.perf_counter()
    sizes = Thumbnails().get_results()
    elapsed = time.perf_counter() - started
    out = Path("results/thumbnails/additional_results")
    made = sorted(path.name for path in out.rglob("*.png"))
    print(f"{len(sizes)} pictures, {len(made)} thumbnails in {elapsed:.2f} s, in {out}/")
    for (name, _), (width, height) in sorted(sizes.items())[:3]:
        print(f"  {name}: {width}x{height}")
