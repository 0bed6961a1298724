"""Render the shipped example video: a blue ball rolling from left to right across a photo.

    python examples/make_video.py [--out examples/blue_ball.mp4] [--seconds 6] [--fps 8]

The background is scikit-image's `coffee` photo (offline, shipped with scikit-image), cropped to
16:9 and resized to 448 x 252; the ball (radius 20 px) crosses it at constant speed with a small
bounce. H.264 in an mp4 (PyAV), deterministic for a given PyAV build. At Qwen2.5-VL's 2 fps the
6-second video samples 12 frames: 6 temporal patches of 16 x 9 merged tokens (864 visual tokens).
Question: "Which direction does the blue ball move?" (answer: from left to right).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (448, 252)  # width, height
RADIUS = 20


def background(size: tuple[int, int] = SIZE) -> Image.Image:
    import skimage.data

    photo = Image.fromarray(skimage.data.coffee())  # 600 x 400
    w, h = photo.size
    crop_h = round(w * size[1] / size[0])
    top = (h - crop_h) // 2
    return photo.crop((0, top, w, top + crop_h)).resize(size, Image.BICUBIC)


def frames(seconds: float, fps: int, size: tuple[int, int] = SIZE) -> list[np.ndarray]:
    """The video's frames (uint8 [height, width, 3]), `size` = (width, height)."""
    base = background(size)
    n = int(round(seconds * fps))
    out = []
    for i in range(n):
        x = RADIUS + (size[0] - 2 * RADIUS) * i / max(1, n - 1)
        y = size[1] * 0.62 - 30 * abs(np.sin(np.pi * 3 * i / max(1, n - 1)))
        im = base.copy()
        ImageDraw.Draw(im).ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS), fill=(30, 110, 255),
                                   outline=(0, 30, 110), width=2)
        out.append(np.asarray(im))
    return out


def write(path: Path, images: list[np.ndarray], fps: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        stream.options = {"crf": "26", "preset": "medium"}
        for im in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(im, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "blue_ball.mp4"))
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--fps", type=int, default=8)
    args = p.parse_args(argv)
    write(Path(args.out), frames(args.seconds, args.fps), args.fps)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
