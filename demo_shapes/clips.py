"""The demo's clips: one shape moving across the picture, or standing still, as short MP4s.

A clip is a single-shape scene of the pictures (same colours, shapes, sizes and renderer)
whose shape moves in a straight line through FRAMES frames: from one side of the picture to
the other (left to right, right to left, top to bottom, bottom to top) or not at all. The
model sees 4 evenly spaced keyframes of it (the trainers' --frames), so telling the direction
means comparing where the shape is in the first and in the last keyframe: a still shape can
stand anywhere, including where a moving one starts.

`generate_clip_data` writes a training set (video records, the JSONL layout of
dataset/records.py) and held-out questions, each with its own folder of clips, next to the
picture sets of records.py, and reuses complete output with the same settings like
`generate_demo_data`. Held-out clips are never identical to training ones.
"""
import hashlib
import json
import math
import os
import random
import shutil

import numpy as np

from .pictures import IMAGE_SIZE, VERSION, render_scene, sample_scene
from .records import DEMO_DATA_DIR, FILES, conv

FRAMES = 8            # frames per clip, at FPS: one second; keyframes of 4 are frames 1, 3, 5, 7
FPS = 8
N_KEYFRAMES = 4       # what the demo trains and asks with (the trainers' default --frames)
# The frames those are: model/video.py's rule for a constant-rate clip, floor((i + 0.5) F / N).
KEYFRAMES = [(2 * i + 1) * FRAMES // (2 * N_KEYFRAMES) for i in range(N_KEYFRAMES)]
# Motion -> (dx, dy) direction in picture coordinates (y grows downwards).
MOTIONS = {
    "从左往右": (1, 0),
    "从右往左": (-1, 0),
    "从上往下": (0, 1),
    "从下往上": (0, -1),
    "没有移动": (0, 0),
}
# A moving shape starts and ends within this many px of the picture's edges (where a shape of
# its size still fits whole): every move covers most of the picture, so the first and last
# keyframes show the shape in clearly different patches.
EDGE_SLACK = 16
CLIP_QUESTIONS = {
    "direction": ["形状往哪个方向移动？", "图形是怎么移动的？", "视频里的形状往哪边动？"],
    "shape": ["视频里是什么形状？", "视频中的图形是什么形状？"],
}
CLIP_QTYPES = list(CLIP_QUESTIONS)
CLIP_FILES = {  # set name -> (jsonl, clip folder)
    "video": ("video_data.jsonl", "video_clips"),
    "video_heldout": ("video_heldout.jsonl", "video_heldout_clips"),
}
CLIP_MANIFEST = "video_manifest.json"
# Bumped whenever the records' text changes, so that older generated clip sets are rebuilt.
CLIP_FORMAT = 3


# Where the shape is in a frame: the picture cut into thirds each way.
THIRDS = {"x": ("左", "", "右"), "y": ("上", "", "下")}


def where(x, y):
    """The shape's place in a frame, in words: 左上, 上边, 中间, 右边 ... (a 3x3 grid)."""
    col, row = (THIRDS[axis][min(2, int(3 * c // IMAGE_SIZE))] for axis, c in (("x", x), ("y", y)))
    return col + row if col and row else (col or row) + "边" if col or row else "中间"


def clip_answer(qtype, a):
    """A direction answer first says where the shape is in the first and in the last keyframe,
    then concludes: the tiny model compares what it has just written, as the two-picture
    answers do (docs/demo_notes.md: describe, then conclude). A still shape is in the same
    place twice; a moving one changes thirds along its motion."""
    if qtype == "direction":
        # The same words up to the conclusion, still or not: the model decides only after it
        # has written both places (with "也在" for a still shape it had to decide before).
        conclusion = "没有移动" if a["motion"] == "没有移动" else f"是{a['motion']}移动"
        return f"第一帧里它在{a['first']}，最后一帧里在{a['last']}，所以{conclusion}。"
    return a["shape"] + "。"


# ----------------------------------------------------------------------------- clips

def sample_clip(rng, motion=None, shape=None):
    """A clip description: the scene of its first frame plus where its shape is in each frame."""
    motion = motion or rng.choice(list(MOTIONS))
    scene = sample_scene(rng, count=1, shape=shape)  # colour, shape, size, tints as for pictures
    size = scene["items"][0][2]
    reach = math.ceil(0.55 * size) + 1               # as sample_scene: no part of it is cut off
    low, high = reach, IMAGE_SIZE - 1 - reach
    dx, dy = MOTIONS[motion]

    def path(d):
        """Start and end of one coordinate: edge to edge along the motion, fixed across it."""
        if d == 0:
            c = rng.randint(low, high)
            return c, c
        start, end = rng.randint(low, low + EDGE_SLACK), rng.randint(high - EDGE_SLACK, high)
        return (start, end) if d > 0 else (end, start)

    (x0, x1), (y0, y1) = path(dx), path(dy)
    centres = [(round(x0 + (x1 - x0) * k / (FRAMES - 1)), round(y0 + (y1 - y0) * k / (FRAMES - 1)))
               for k in range(FRAMES)]
    return {**scene, "motion": motion, "centres": centres, "size": size}


def clip_attrs(clip):
    """What the answers say: the motion, the shape, and where the shape is in the first and the
    last keyframe."""
    first, last = clip["centres"][KEYFRAMES[0]], clip["centres"][KEYFRAMES[-1]]
    return {"motion": clip["motion"], "shape": clip["shape"], "colour": clip["colour"],
            "first": where(*first), "last": where(*last)}


def render_clip(clip):
    """The clip's frames as RGB pictures, drawn by the pictures' renderer."""
    return [render_scene({**clip, "items": [(cx, cy, clip["size"])]}) for cx, cy in clip["centres"]]


def frames_digest(frames):
    """Identical frames give identical digests (compared before encoding: MP4 bytes need not be)."""
    h = hashlib.md5()
    for frame in frames:
        h.update(np.asarray(frame, dtype=np.uint8).tobytes())
    return h.hexdigest()


def save_clip(folder, name, frames):
    from model.video import write_video  # PyAV: imported only when clips are written

    write_video(frames, os.path.join(folder, name), fps=FPS)


# ----------------------------------------------------------------------------- record sets

def _stream(seed, name):
    # Own streams, apart from the pictures' ones: adding clips changes no picture.
    return random.Random(f"minimind-v-demo-clips:{seed}:{name}")


def _gen_train(folder, seed, n):
    """Clip records of 1-2 questions (direction and/or shape); returns (records, frame digests)."""
    rng, records, seen = _stream(seed, "video"), [], set()
    for i in range(n):
        clip = sample_clip(rng)
        frames = render_clip(clip)
        seen.add(frames_digest(frames))
        name = f"video_{i:06d}.mp4"
        save_clip(folder, name, frames)
        qtypes = rng.sample(CLIP_QTYPES, rng.randint(1, len(CLIP_QTYPES)))
        turns = []
        for k, t in enumerate(qtypes):   # the clip is marked in the first question only
            mark = "<video>\n" if k == 0 else ""
            turns += conv(rng.choice(CLIP_QUESTIONS[t]), clip_answer(t, clip_attrs(clip)), mark)
        records.append({"id": f"video_{i:06d}", "video": name, "conversations": turns})
    return records, seen


def _gen_heldout(folder, seed, n, forbidden):
    """Held-out questions, the types in turn and each type's clips through the motions in turn;
    a clip identical to a training one is redrawn (deterministically)."""
    rng, records = _stream(seed, "video_heldout"), []
    motions = list(MOTIONS)
    for i in range(n):
        qtype = CLIP_QTYPES[i % len(CLIP_QTYPES)]
        motion = motions[(i // len(CLIP_QTYPES)) % len(motions)]
        while True:
            clip = sample_clip(rng, motion=motion)
            frames = render_clip(clip)
            if frames_digest(frames) not in forbidden:
                break
        name = f"video_heldout_{i:06d}.mp4"
        save_clip(folder, name, frames)
        attrs = clip_attrs(clip)
        question, ans = "<video>\n" + rng.choice(CLIP_QUESTIONS[qtype]), clip_answer(qtype, attrs)
        records.append({"id": f"video_heldout_{i:06d}", "video": name, "qtype": qtype, "question": question,
                        "answer": ans, "attrs": attrs, "conversations": conv(question, ans)})
    return records


def _rehearsal(out_dir, folder, seed, n):
    """`n` records of the two-picture stage's set (one- and two-picture questions), their
    pictures linked into the clip folder: mixed into the clip set so that the video stage does
    not forget pictures, as the two-picture stage rehearses single pictures."""
    if n == 0:
        return []
    data, images = FILES["sft_multi"]
    with open(os.path.join(out_dir, data), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    chosen = _stream(seed, "rehearsal").sample(records, min(n, len(records)))
    for record in chosen:
        for name in record["image"].split(", "):
            link = os.path.join(folder, name)
            if not os.path.lexists(link):
                os.symlink(os.path.realpath(os.path.join(out_dir, images, name)), link)
    return chosen


def generate_clip_data(out_dir=DEMO_DATA_DIR, seed=0, n_train=2000, n_heldout=160, n_rehearsal=0, force=False):
    """Write the clip training set and held-out clip questions into `out_dir` (their own files,
    next to the picture sets); reuse complete output with the same settings. Returns the manifest.
    `n_rehearsal` picture records of the two-picture set (generate_demo_data's, which must be
    there) join the training set."""
    manifest = {"version": VERSION, "clip_format": CLIP_FORMAT, "seed": seed, "n_train": n_train,
                "n_heldout": n_heldout, "n_rehearsal": n_rehearsal, "frames": FRAMES,
                "files": {k: {"data": d, "clips": c} for k, (d, c) in CLIP_FILES.items()}}
    manifest_path = os.path.join(out_dir, CLIP_MANIFEST)
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f) == manifest and all(os.path.isfile(os.path.join(out_dir, d))
                                                for d, _ in CLIP_FILES.values()):
                return manifest
        os.remove(manifest_path)
    for data, clips in CLIP_FILES.values():   # start clean: no stale clips stay behind
        shutil.rmtree(os.path.join(out_dir, clips), ignore_errors=True)
        os.makedirs(os.path.join(out_dir, clips))
        if os.path.isfile(os.path.join(out_dir, data)):
            os.remove(os.path.join(out_dir, data))
    folders = {k: os.path.join(out_dir, c) for k, (_, c) in CLIP_FILES.items()}
    train, seen = _gen_train(folders["video"], seed, n_train)
    train += _rehearsal(out_dir, folders["video"], seed, n_rehearsal)
    _stream(seed, "video_order").shuffle(train)
    sets = {"video": train, "video_heldout": _gen_heldout(folders["video_heldout"], seed, n_heldout, seen)}
    for name, records in sets.items():
        with open(os.path.join(out_dir, CLIP_FILES[name][0]), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(manifest_path, "w", encoding="utf-8") as f:   # last: a manifest means complete output
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest
