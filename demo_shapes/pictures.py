"""The demo's pictures: random scenes of coloured shapes, drawn with PIL and saved as PNG.

A scene holds 1-3 shapes that share one colour and one kind, so every question about it has
exactly one right answer. A single shape sits in one of five regions (the only case with a
position); several shapes each take a different corner.

`sample_scene` describes a picture, `render_scene` draws it, `scene_png` encodes it and
`save_pictures` writes a whole set of them.
"""
import hashlib
import math
import os
import shutil
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generated data or the demo CLIP change, so stale output on disk is regenerated.
VERSION = 6
IMAGE_SIZE = 224

# Well-separated hues; each channel is jittered by at most COLOUR_JITTER, which keeps them apart.
COLOURS = {
    "红色": (215, 35, 35),
    "橙色": (245, 140, 20),
    "黄色": (230, 205, 25),
    "绿色": (35, 160, 55),
    "蓝色": (35, 75, 220),
    "紫色": (140, 45, 180),
}
COLOUR_JITTER = 12
SHAPES = ["圆形", "正方形", "三角形"]
# Region centres. The corners sit in the middle of a 112-px quadrant (3.5 patches of 32 px),
# so each position covers clearly different patches of the vision encoder.
POSITIONS = {
    "左上": (56, 56),
    "右上": (168, 56),
    "左下": (56, 168),
    "右下": (168, 168),
    "中间": (112, 112),
}
# Nominal size in px of a single shape (a circle's diameter). Large: what tells a circle from a
# square is the few corner pixels, and only big shapes give the 32-px patches enough of them.
SIZE_RANGE = (60, 90)
MULTI_SIZE_RANGE = (44, 70)   # several shapes share the picture, one per corner
POS_JITTER = 10         # px; with shapes <= 88 px wide, shapes on adjacent corners never touch


# ----------------------------------------------------------------------------- scenes

def sample_scene(rng, count=None, colour=None, shape=None, position=None):
    """Random picture description: one colour, one kind of shape, 1-3 copies."""
    if count is None:
        count = rng.choice([1, 1, 2, 3])  # single shapes are the only ones with a position
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    if count == 1:
        position = position or rng.choice(list(POSITIONS))
        slots = [position]
        size_range = SIZE_RANGE
    else:
        # Several shapes go to distinct corners (never the centre, which would touch them).
        position = None
        slots = rng.sample(["左上", "右上", "左下", "右下"], count)
        size_range = MULTI_SIZE_RANGE
    items = []
    for slot in slots:
        cx, cy = POSITIONS[slot]
        size = rng.randint(*size_range)
        # A big shape near a corner is nudged inwards so that none of it is cut off (a triangle,
        # drawn 1.1x larger, reaches 0.55 * size from its centre).
        reach = math.ceil(0.55 * size) + 1
        cx, cy = (min(max(c + rng.randint(-POS_JITTER, POS_JITTER), reach), IMAGE_SIZE - 1 - reach)
                  for c in (cx, cy))
        items.append((cx, cy, size))
    base = rng.randint(225, 250)  # light, low-saturation background tint
    bg = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    rgb = tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    return {"colour": colour, "shape": shape, "count": count, "position": position,
            "items": items, "bg": bg, "rgb": rgb}


def attrs_of(scene):
    """What a scene shows, as the questions ask about it (no pixel details)."""
    return {k: scene[k] for k in ("colour", "shape", "count", "position")}


# ----------------------------------------------------------------------------- drawing

def shape_polygon(shape, cx, cy, size):
    """Corner points (or bounding box for circles) of a shape of nominal size `size`."""
    if shape == "圆形":
        r = size / 2
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "正方形":
        # The full box (not the circle's area): the filled corners are what tells a square from
        # a circle when the encoder sees 32-px patches, so they should not be shaved off.
        h = size / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "三角形":
        side = size * 1.1  # a bit larger: a triangle fills less of its box
        height = side * 0.866
        return [(cx, cy - height / 2), (cx - side / 2, cy + height / 2), (cx + side / 2, cy + height / 2)]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene):
    """The scene as an RGB picture of IMAGE_SIZE x IMAGE_SIZE."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene["bg"])
    draw = ImageDraw.Draw(img)
    for cx, cy, size in scene["items"]:
        points = shape_polygon(scene["shape"], cx, cy, size)
        if scene["shape"] == "圆形":
            draw.ellipse(points, fill=scene["rgb"])
        else:
            draw.polygon(points, fill=scene["rgb"])
    return img


# ----------------------------------------------------------------------------- PNG files

def png_bytes(img):
    """PNG bytes of an RGB picture. Written by hand because PIL's encoder chooses a filter for
    every row, which costs time and buys nothing on flat-colour pictures (rows here use filter
    0); see docs/demo_notes.md."""
    width, height = img.size
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: each row's filter byte
    rows[:, 1:] = np.asarray(img, dtype=np.uint8).reshape(height, -1)
    rows = rows.tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 3))
            + chunk(b"IEND", b""))


def scene_png(scene):
    """PNG bytes of a scene. Identical pixels give identical bytes, so `png_digest` of these
    tells whether two pictures are the same."""
    return png_bytes(render_scene(scene))


def png_digest(png):
    return hashlib.md5(png).hexdigest()


def save_pictures(folder, jobs, shared_folder=None):
    """Render and save [(file name, scene, shared)]; a shared picture is already in
    `shared_folder` and gets a symlink (a copy where links are not allowed) instead.
    Returns the set of digests of the pictures rendered here."""
    os.makedirs(folder, exist_ok=True)
    digests = set()
    for name, scene, shared in jobs:
        dest = os.path.join(folder, name)
        if shared:
            if not os.path.lexists(dest):
                source = os.path.join(shared_folder, name)
                try:
                    os.symlink(os.path.relpath(source, folder), dest)
                except OSError:
                    shutil.copyfile(source, dest)
            continue
        png = scene_png(scene)
        digests.add(png_digest(png))
        with open(dest, "wb") as f:
            f.write(png)
    return digests
