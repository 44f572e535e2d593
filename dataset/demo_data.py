"""Offline demo data: pictures of coloured shapes in the original MiniMind-V data formats.

The demo proves the VLM pipeline learns on a CPU in minutes: a frozen, randomly initialised
tiny CLIP (`make_demo_clip`) feeds a tiny LLM trained on generated pictures
(`generate_demo_data`), which is then scored on held-out pictures (`score_answer`).

Every picture holds 1-3 shapes that share one colour and one kind, so every question has
exactly one right answer; positions are only asked about when there is a single shape.

    python dataset/demo_data.py [--out_dir dataset/demo] [--seed 0] [--force]
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so `python dataset/demo_data.py` works from the repo root
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# Bump when the generated data changes, so stale output on disk is regenerated.
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
POSITION_WORDS = {"左上": "左上角", "右上": "右上角", "左下": "左下角", "右下": "右下角", "中间": "中间"}
COUNT_WORDS = {1: "一个", 2: "两个", 3: "三个"}
# Nominal size in px of a single shape (a circle's diameter). Large: what tells a circle from a
# square is the few corner pixels, and only big shapes give the 32-px patches enough of them.
SIZE_RANGE = (60, 90)
MULTI_SIZE_RANGE = (44, 70)   # several shapes share the picture, one per corner
POS_JITTER = 10         # px; with shapes <= 88 px wide, shapes on adjacent corners never touch
DEMO_CLIP_POSITION_STD = 1.0   # see make_demo_clip

CAPTION_QUESTIONS = [
    "这个图片描述的是什么内容？",
    "描述一下这张图片。",
    "图片里有什么？",
    "请简要描述这张图片。",
    "这张图片展示了什么？",
]
QUESTIONS = {
    "caption": CAPTION_QUESTIONS,
    "colour": ["图中的形状是什么颜色？", "图形是什么颜色的？", "图片里的形状是什么颜色？"],
    "shape": ["图中是什么形状？", "图片里画的是什么图形？", "这是什么形状？"],
    "position": ["这个形状在图片的什么位置？", "图形位于图片的哪个位置？", "形状在图片的哪里？"],
    "count": ["图中有几个形状？", "图片里一共有多少个图形？", "数一数图中有几个形状。"],
}
MULTI_QUESTIONS = {
    # The colour and shape come last, right before the answer: asked as "{colour}的{shape}在哪张
    # 图片里？", with the words further back, the tiny model misread them three times as often.
    "which": ["哪张图片里有{colour}的{shape}？", "哪一张图片画的是{colour}的{shape}？"],
    "same_shape": ["两张图片中的形状一样吗？", "两张图片里的图形形状相同吗？"],
    "same_colour": ["两张图片中的颜色一样吗？", "两张图片里的图形颜色相同吗？"],
    "same_count": ["两张图片中的形状数量一样吗？", "两张图片里的图形一样多吗？"],
}
SINGLE_QTYPES = list(QUESTIONS)
HELDOUT_QTYPES = SINGLE_QTYPES + ["multi"]
# One mark per picture before the question: the layout 3-eval_chat.py uses for several pictures.
MULTI_PREFIX = "<image>\n<image>\n"
ORDINALS = ["第一张", "第二张"]

FILES = {  # set name -> (jsonl, image folder), the original MiniMind-V layout
    "pretrain": ("pretrain_data.jsonl", "pretrain_images"),
    "sft": ("sft_data.jsonl", "sft_images"),
    "sft_multi": ("sft_multi_data.jsonl", "sft_multi_images"),
    "heldout": ("heldout.jsonl", "heldout_images"),
}
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- pictures

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
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene["bg"])
    draw = ImageDraw.Draw(img)
    for cx, cy, size in scene["items"]:
        points = shape_polygon(scene["shape"], cx, cy, size)
        if scene["shape"] == "圆形":
            draw.ellipse(points, fill=scene["rgb"])
        else:
            draw.polygon(points, fill=scene["rgb"])
    return img


def attrs_of(scene):
    return {k: scene[k] for k in ("colour", "shape", "count", "position")}


# ----------------------------------------------------------------------------- answers

def caption(a):
    text = f"图中有{COUNT_WORDS[a['count']]}{a['colour']}的{a['shape']}"
    if a["count"] == 1:
        text += f"，位于{POSITION_WORDS[a['position']]}"
    return text + "。"


def answer(qtype, a):
    if qtype == "caption":
        return caption(a)
    if qtype == "position":
        return POSITION_WORDS[a["position"]] + "。"
    if qtype == "count":
        return COUNT_WORDS[a["count"]] + "。"
    return a[qtype] + "。"  # colour / shape


def multi_qa(rng, mtype, a, b):
    """(question, answer, extra attrs) comparing two pictures.

    Answers describe each picture first and conclude last ("第一张是圆形，第二张是三角形，不一样。"):
    a model that must say "same" or "different" as its first word has to compare both pictures
    in a single step, while one that has just written both descriptions only compares two words
    it can read back. A tiny model learns the second far faster (and it reads better)."""
    if mtype == "which":  # only asked when exactly one picture matches
        target = rng.randrange(2)
        t = (a, b)[target]
        q = rng.choice(MULTI_QUESTIONS[mtype]).format(colour=t["colour"], shape=t["shape"])
        # The answer first repeats what it looks for ("要找…："), then checks each description
        # against that right after writing it. Without the repeat, "which" stayed at chance
        # (50% of 50 held-out pairs, 80% with it, same data and steps otherwise).
        described = "；".join(f"{ORDINALS[k]}是{x['colour']}的{x['shape']}，{'是' if k == target else '不是'}"
                             for k, x in enumerate((a, b)))
        return q, f"要找{t['colour']}的{t['shape']}：{described}；所以是{ORDINALS[target]}图片。", {"target": target}
    key = mtype[len("same_"):]
    fmt = (lambda n: COUNT_WORDS[n]) if key == "count" else (lambda v: v)
    verb = "有" if key == "count" else "是"
    described = "，".join(f"{ORDINALS[k]}{verb}{fmt(x[key])}" for k, x in enumerate((a, b)))
    verdict = "一样" if a[key] == b[key] else "不一样"
    return rng.choice(MULTI_QUESTIONS[mtype]), f"{described}，{verdict}。", {}


def multi_types_for(a, b):
    """Comparison questions with exactly one right answer for this pair."""
    types = ["same_shape", "same_colour", "same_count"]
    if (a["colour"], a["shape"]) != (b["colour"], b["shape"]):
        types.insert(0, "which")
    return types


def partner_attrs(rng, a):
    """What the second picture of a pair shows: each attribute of `a` is shared half of the
    time (count 40%), so "一样" and "不一样" are balanced."""
    shape = a["shape"] if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != a["shape"]])
    colour = a["colour"] if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != a["colour"]])
    count = a["count"] if rng.random() < 0.4 else None
    return dict(count=count, colour=colour, shape=shape)


def sample_pair(rng):
    a = sample_scene(rng)
    return a, sample_scene(rng, **partner_attrs(rng, a))


def conv(question, reply, prefix=""):
    """One human/gpt exchange; `prefix` carries the `<image>` marks of the first question."""
    return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": reply}]


# ----------------------------------------------------------------------------- generation

def _png(img):
    """PNG bytes of an RGB picture. Written by hand because PIL's encoder chooses a filter for
    every row, which makes it 2-3x slower and buys nothing on flat-colour pictures (rows here
    use filter 0); encoding is most of the generation time."""
    width, height = img.size
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: each row's filter byte
    rows[:, 1:] = np.asarray(img, dtype=np.uint8).reshape(height, -1)
    rows = rows.tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 3))
            + chunk(b"IEND", b""))


def _encode(scene):
    """PNG bytes of a scene. Identical pixels give identical bytes, so we hash these."""
    return _png(render_scene(scene))


def _save_all(folder, jobs, shared_folder=None):
    """Render and save [(file name, scene, shared)]; a shared picture is already in
    `shared_folder` and gets a symlink (a copy where links are not allowed) instead.
    Returns the set of hashes of the pictures rendered here."""
    os.makedirs(folder, exist_ok=True)
    hashes = set()
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
        png = _encode(scene)
        hashes.add(hashlib.md5(png).hexdigest())
        with open(dest, "wb") as f:
            f.write(png)
    return hashes


class PicturePool:
    """The pretrain pictures by what they show, for the SFT sets to ask about.

    Reusing them (through symlinks) means the frozen encoder's features are computed once for
    all three stages; that saves about a minute of the demo's ten. (The real SFT data has its
    own pictures; held-out pictures are never in the pool.)"""

    def __init__(self, pretrain_jobs):
        self.by_attrs = {}
        for name, scene, _ in pretrain_jobs:
            self.by_attrs.setdefault(self._key(scene), []).append((name, scene))

    @staticmethod
    def _key(scene):
        return scene["colour"], scene["shape"], scene["count"]

    def draw(self, rng, new_name, avoid=None, **attrs):
        """(file name, scene, shared): a pool picture with `attrs` (the others drawn as
        sample_scene draws them), or a new picture called `new_name` if none has them."""
        scene = sample_scene(rng, **attrs)
        options = [p for p in self.by_attrs.get(self._key(scene), []) if p[0] != avoid]
        if options:
            return (*rng.choice(options), True)
        return new_name, scene, False


def _stream(seed, name):
    # One independent random stream per set: held-out pictures never share jitter with training.
    return random.Random(f"minimind-v-demo:{seed}:{name}")


def _gen_pretrain(seed, n):
    rng, records, jobs = _stream(seed, "pretrain"), [], []
    for i in range(n):
        scene = sample_scene(rng)
        jobs.append((f"pretrain_{i:06d}.png", scene, False))
        q = "<image>\n" + rng.choice(CAPTION_QUESTIONS)
        records.append({"id": f"pretrain_{i:06d}", "image": jobs[-1][0],
                        "conversations": conv(q, caption(attrs_of(scene)))})
    return records, jobs


def _sft_record(rng, name, pool):
    """A single-picture conversation of 1-3 questions; returns (record, (file name, scene, shared))."""
    # The first question type is uniform, so every type is well represented.
    qtype = rng.choice(SINGLE_QTYPES)
    job = pool.draw(rng, f"{name}.png", count=1 if qtype == "position" else rng.choice([1, 2, 3]))
    a = attrs_of(job[1])
    allowed = [t for t in SINGLE_QTYPES if t != "position" or a["count"] == 1]
    qtypes = [qtype] + rng.sample([t for t in allowed if t != qtype], rng.randint(0, 2))
    turns = []
    for k, t in enumerate(qtypes):  # 1-3 turns; the picture is marked in the first one only
        turns += conv(rng.choice(QUESTIONS[t]), answer(t, a), "<image>\n" if k == 0 else "")
    return {"id": name, "image": job[0], "conversations": turns}, job


def _gen_sft(seed, n, pool):
    rng, records, jobs = _stream(seed, "sft"), [], []
    for i in range(n):
        record, job = _sft_record(rng, f"sft_{i:06d}", pool)
        records.append(record)
        jobs.append(job)
    return records, jobs


def _gen_multi(seed, n, pool, n_rehearsal=0):
    """Two-picture conversations, plus `n_rehearsal` single-picture ones mixed in so that the
    last stage does not forget what SFT taught (rehearsal); the original data has none."""
    rng, records, jobs = _stream(seed, "sft_multi"), [], []
    for i in range(n):
        first = pool.draw(rng, f"multi_{i:06d}_a.png")
        second = pool.draw(rng, f"multi_{i:06d}_b.png", avoid=first[0], **partner_attrs(rng, first[1]))
        jobs += [first, second]
        a, b = attrs_of(first[1]), attrs_of(second[1])
        names = [first[0], second[0]]
        turns = []
        for k, mtype in enumerate(rng.sample(multi_types_for(a, b), rng.randint(1, 2))):
            q, ans, _ = multi_qa(rng, mtype, a, b)
            turns += conv(q, ans, MULTI_PREFIX if k == 0 else "")
        records.append({"id": f"multi_{i:06d}", "image": ", ".join(names), "conversations": turns})
    for i in range(n_rehearsal):
        record, job = _sft_record(rng, f"multi_single_{i:06d}", pool)
        records.append(record)
        jobs.append(job)
    rng.shuffle(records)
    return records, jobs


def _gen_heldout(folder, seed, n, forbidden):
    """Held-out records; a picture identical to a training one is redrawn (deterministically)."""
    rng, records = _stream(seed, "heldout"), []
    os.makedirs(folder, exist_ok=True)

    def fresh(scene):
        png = _encode(scene)
        return None if hashlib.md5(png).hexdigest() in forbidden else png

    for i in range(n):
        qtype = HELDOUT_QTYPES[i % len(HELDOUT_QTYPES)]
        rid = f"heldout_{i:06d}"
        if qtype == "multi":
            mtype = list(MULTI_QUESTIONS)[(i // len(HELDOUT_QTYPES)) % len(MULTI_QUESTIONS)]
            while True:
                a_scene, b_scene = sample_pair(rng)
                a, b = attrs_of(a_scene), attrs_of(b_scene)
                pngs = [fresh(a_scene), fresh(b_scene)]
                if mtype in multi_types_for(a, b) and all(pngs):
                    break
            names = [f"{rid}_{k}.png" for k in "ab"]
            q, ans, extra = multi_qa(rng, mtype, a, b)
            question = MULTI_PREFIX + q
            record_attrs = {"mtype": mtype, "images": [a, b], **extra}
        else:
            count = 1 if qtype == "position" else rng.choice([1, 2, 3])
            while True:
                scene = sample_scene(rng, count=count)
                pngs = [fresh(scene)]
                if pngs[0]:
                    break
            names = [f"{rid}.png"]
            record_attrs = attrs_of(scene)
            question = "<image>\n" + rng.choice(QUESTIONS[qtype])
            ans = answer(qtype, record_attrs)
        for name, png in zip(names, pngs):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(png)
        records.append({"id": rid, "image": ", ".join(names), "qtype": qtype, "question": question,
                        "answer": ans, "attrs": record_attrs, "conversations": conv(question, ans)})
    return records


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate_demo_data(out_dir="dataset/demo", seed=0, n_pretrain=4000, n_sft=4000, n_multi=1000,
                       n_heldout=300, n_rehearsal=0, force=False):
    """Write the four demo sets into `out_dir`; reuse complete output with the same settings.

    Returns the manifest (seed, counts, version and the file names of each set).
    """
    manifest = {"version": VERSION, "seed": seed, "n_pretrain": n_pretrain, "n_sft": n_sft,
                "n_multi": n_multi, "n_heldout": n_heldout, "n_rehearsal": n_rehearsal,
                "files": {k: {"data": d, "images": i} for k, (d, i) in FILES.items()}}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        if old == manifest and all(os.path.isfile(os.path.join(out_dir, d)) for d, _ in FILES.values()):
            return manifest
    # Start clean (only our own files) so no stale pictures from another run stay behind.
    for data, images in FILES.values():
        shutil.rmtree(os.path.join(out_dir, images), ignore_errors=True)
        if os.path.isfile(os.path.join(out_dir, data)):
            os.remove(os.path.join(out_dir, data))
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    os.makedirs(out_dir, exist_ok=True)

    sets = {}
    sets["pretrain"], pretrain_jobs = _gen_pretrain(seed, n_pretrain)
    pretrain_folder = os.path.join(out_dir, FILES["pretrain"][1])
    seen = _save_all(pretrain_folder, pretrain_jobs)
    pool = PicturePool(pretrain_jobs)
    later = {"sft": _gen_sft(seed, n_sft, pool), "sft_multi": _gen_multi(seed, n_multi, pool, n_rehearsal)}
    for name, (records, jobs) in later.items():
        sets[name] = records
        seen |= _save_all(os.path.join(out_dir, FILES[name][1]), jobs, shared_folder=pretrain_folder)
    sets["heldout"] = _gen_heldout(os.path.join(out_dir, FILES["heldout"][1]), seed, n_heldout, seen)
    for name, records in sets.items():
        _write_jsonl(os.path.join(out_dir, FILES[name][0]), records)
    # Written last: a manifest means the output is complete.
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest


# ----------------------------------------------------------------------------- scoring

def _mentions(text, words):
    """Values of `words` (keyword -> value) found in `text`, in order of appearance."""
    pattern = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return [words[m.group(0)] for m in re.finditer(pattern, text)]


_COLOUR_WORDS = {name[0]: name for name in COLOURS}  # "红" also catches "红的", "红颜色"
_SHAPE_WORDS = {"圆": "圆形", "正方": "正方形", "方形": "正方形", "方块": "正方形", "三角": "三角形"}
_POSITION_WORDS = {"左上": "左上", "右上": "右上", "左下": "左下", "右下": "右下",
                   "中间": "中间", "中央": "中间", "正中": "中间", "中心": "中间"}
_NUMBER_WORDS = {**{str(d): d for d in range(10)},
                 **{c: i for i, c in enumerate("零一二三四五六七八九十")}, "两": 2, "俩": 2}
# Words whose numeral characters are not counts.
_NOT_COUNTS = re.compile("三角|一样|一种|同一|第[一二两12]|[一两12]张|一下|一共|一起")


def colours_in(text):
    return _mentions(text, _COLOUR_WORDS)


def shapes_in(text):
    return _mentions(text, _SHAPE_WORDS)


def positions_in(text):
    return _mentions(text, _POSITION_WORDS)


def counts_in(text):
    return _mentions(_NOT_COUNTS.sub(" ", text), _NUMBER_WORDS)


def _verdict(text):
    """True for "same", False for "different", None when the answer does not say."""
    if re.search("不一样|不同|不相同|不是|不一致", text):
        return False
    if re.search("一样|相同|一致|都是|都有", text):
        return True
    return None


def _states(found, expected):
    """The answer names the expected value and nothing contradicting it."""
    return len(found) > 0 and set(found) == {expected}


def score_answer(record, answer_text):
    """Does `answer_text` state the right fact for a held-out record?"""
    a, text = record["attrs"], answer_text.strip()
    qtype = record["qtype"]
    if qtype == "colour":
        return _states(colours_in(text), a["colour"])
    if qtype == "shape":
        return _states(shapes_in(text), a["shape"])
    if qtype == "position":
        return _states(positions_in(text), a["position"])
    if qtype == "count":
        return _states(counts_in(text), a["count"])
    if qtype == "caption":
        ok = (_states(colours_in(text), a["colour"]) and _states(shapes_in(text), a["shape"])
              and _states(counts_in(text), a["count"]))
        # A position is not required, but a wrong one (or one for several shapes) is an error.
        positions = positions_in(text)
        return ok and (not positions or (a["count"] == 1 and set(positions) == {a["position"]}))
    if qtype == "multi":
        return _score_multi(a, text)
    raise ValueError(f"unknown qtype {qtype!r}")


def names_colour_and_shape(record, answer_text):
    """The pretrain-caption target: the caption names the right colour and the right shape."""
    a = record["attrs"]
    return (_states(colours_in(answer_text), a["colour"])
            and _states(shapes_in(answer_text), a["shape"]))


def _score_multi(a, text):
    first, second = a["images"]
    if a["mtype"] == "which":
        # The conclusion is what counts: the part after the last "所以" (so), if any.
        conclusion = text.rsplit("所以", 1)[-1]
        said = _mentions(conclusion, {"第一": 0, "第1": 0, "第二": 1, "第2": 1, "两张": -1, "都": -1})
        return said != [] and set(said) == {a["target"]}
    key = a["mtype"][len("same_"):]
    find = {"shape": shapes_in, "colour": colours_in, "count": counts_in}[key]
    same = first[key] == second[key]
    if _verdict(text) != same:
        return False
    # Any values the answer adds must be the right ones, in picture order.
    found = find(text)
    return not found or found == [first[key], second[key]] or (same and found == [first[key]])


# ----------------------------------------------------------------------------- vision tower

def make_demo_clip(path="model/vision_model/demo-clip", seed=0, hidden_size=512, num_layers=1,
                   position_std=DEMO_CLIP_POSITION_STD, force=False):
    """Save a small randomly initialised CLIP (plus image processor) laid out like the real one.

    The encoder stays frozen in the demo, so random weights just have to keep colour, shape and
    position apart. The patch embedding is a random linear map of each 32x32 patch, so each of
    the 49 patch tokens keeps what its patch shows (tests check that pictures differing only in
    colour give clearly different features). Width matters more than depth: a linear probe
    tells circles from squares better on 512-wide tokens than on 256-wide ones, while random
    layers only add a near-uniform attention average to the residual stream, so one layer is
    enough.
    Position embeddings are drawn with `position_std` instead of CLIP's 0.02. At 0.02 they are
    ~1% of a patch embedding (norm ~0.5 against ~45), so every token said what its patch shows
    but not where it is; the LLM then had to work out left from right from the token's index
    alone, and mixed them up. A trained CLIP learns strong position embeddings; this stands in.
    """
    # Recorded in config.json so a folder made with other settings is rebuilt, not reused.
    recipe = {"version": VERSION, "seed": seed, "hidden_size": hidden_size, "num_layers": num_layers,
              "position_std": position_std}
    files = [os.path.join(path, f) for f in ("config.json", "preprocessor_config.json", "model.safetensors")]
    if not force and all(map(os.path.isfile, files)):
        with open(files[0], encoding="utf-8") as f:
            if json.load(f).get("demo_clip_recipe") == recipe:
                return path  # checked before importing torch, so reuse is instant

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before the imports below, which warn too
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        # The text tower is unused; it is here (tiny) so the folder is a complete CLIPModel.
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=1024, max_position_embeddings=77),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                           image_size=IMAGE_SIZE, patch_size=32),
        projection_dim=min(hidden_size, 128),
        demo_clip_recipe=recipe,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.normal_(0.0, position_std)
    os.makedirs(path, exist_ok=True)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar for 2 MB
    model.save_pretrained(path)
    if bars:
        transformers.utils.logging.enable_progress_bar()
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the offline shapes demo data and the demo CLIP.")
    p.add_argument("--out_dir", default="dataset/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if complete output exists")
    # Defaults: the sizes of `python demo.py` (its "full" plan), so the two share the output.
    p.add_argument("--n_pretrain", type=int, default=6000)
    p.add_argument("--n_sft", type=int, default=5000)
    p.add_argument("--n_multi", type=int, default=3000)
    p.add_argument("--n_rehearsal", type=int, default=500, help="single-picture records mixed into sft_multi")
    p.add_argument("--n_heldout", type=int, default=480)
    p.add_argument("--clip_path", default="model/vision_model/demo-clip")
    p.add_argument("--clip_hidden_size", type=int, default=512)
    p.add_argument("--clip_layers", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.time()
    m = generate_demo_data(args.out_dir, args.seed, args.n_pretrain, args.n_sft, args.n_multi,
                           args.n_heldout, n_rehearsal=args.n_rehearsal, force=args.force)
    print(f"data: {args.out_dir} (pretrain {m['n_pretrain']}, sft {m['n_sft']}, multi {m['n_multi']} "
          f"+ {m['n_rehearsal']} rehearsal, held-out {m['n_heldout']}) in {time.time() - t0:.1f}s")
    t0 = time.time()
    make_demo_clip(args.clip_path, seed=args.seed, hidden_size=args.clip_hidden_size,
                   num_layers=args.clip_layers, force=args.force)
    print(f"demo CLIP: {args.clip_path} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
