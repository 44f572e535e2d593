"""The demo's records: questions and answers about the pictures, in the original data formats.

`generate_demo_data` writes four sets into one folder, each a JSONL file with an image folder:
pretrain captions, single-picture SFT conversations, two-picture SFT conversations (plus
optional single-picture rehearsal) and held-out questions for scoring. The SFT sets ask about
the pretrain pictures (`PicturePool`); held-out pictures never appear in training. Each set
draws from its own random stream, and a manifest records the settings so that complete output
is reused rather than regenerated.
"""
import json
import os
import random
import shutil

from .pictures import (COLOURS, SHAPES, VERSION, attrs_of, png_digest, sample_scene, save_pictures,
                       scene_png)

DEMO_DATA_DIR = "dataset/demo"

POSITION_WORDS = {"左上": "左上角", "右上": "右上角", "左下": "左下角", "右下": "右下角", "中间": "中间"}
COUNT_WORDS = {1: "一个", 2: "两个", 3: "三个"}

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
    # The colour and shape come last, right before the answer: the tiny model misreads them
    # more often when they sit further back in the question (see docs/demo_notes.md).
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
        # against that right after writing it: the tiny model needs the repeat in front of it to
        # pick the right picture (see docs/demo_notes.md).
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


# ----------------------------------------------------------------------------- record sets

class PicturePool:
    """The pretrain pictures by what they show, for the SFT sets to ask about.

    Reusing them (through symlinks) means the frozen encoder's features are computed once for
    all three stages (see docs/demo_notes.md for what that saves). The real SFT data has its
    own pictures; held-out pictures are never in the pool."""

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
        png = scene_png(scene)
        return None if png_digest(png) in forbidden else png

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


# ----------------------------------------------------------------------------- the demo folder

def generate_demo_data(out_dir=DEMO_DATA_DIR, seed=0, n_pretrain=4000, n_sft=4000, n_multi=1000,
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
    seen = save_pictures(pretrain_folder, pretrain_jobs)
    pool = PicturePool(pretrain_jobs)
    later = {"sft": _gen_sft(seed, n_sft, pool), "sft_multi": _gen_multi(seed, n_multi, pool, n_rehearsal)}
    for name, (records, jobs) in later.items():
        sets[name] = records
        seen |= save_pictures(os.path.join(out_dir, FILES[name][1]), jobs, shared_folder=pretrain_folder)
    sets["heldout"] = _gen_heldout(os.path.join(out_dir, FILES["heldout"][1]), seed, n_heldout, seen)
    for name, records in sets.items():
        _write_jsonl(os.path.join(out_dir, FILES[name][0]), records)
    # Written last: a manifest means the output is complete.
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    return manifest
