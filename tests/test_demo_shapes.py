"""Tests of demo_shapes, the offline demo's material: generated data, answer scoring and the demo CLIP."""
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import demo_shapes as ds
from demo_shapes.__main__ import main as demo_shapes_cli

SMALL = dict(n_pretrain=120, n_sft=120, n_multi=30, n_heldout=60)
TRAIN_SETS = ("pretrain", "sft", "sft_multi")


def load(out_dir, name):
    with open(os.path.join(out_dir, ds.FILES[name][0]), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def image_paths(out_dir, name, record):
    return [os.path.join(out_dir, ds.FILES[name][1], n.strip()) for n in record["image"].split(",")]


def tree_digest(out_dir):
    """One hash of every file's relative path and bytes."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(out_dir)):
        for fn in sorted(files):
            path = os.path.join(root, fn)
            h.update(os.path.relpath(path, out_dir).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    ds.generate_demo_data(out, seed=0, **SMALL)
    return out


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    ds.generate_demo_data(again, seed=0, **SMALL)
    ds.generate_demo_data(other, seed=1, **SMALL)
    assert tree_digest(again) == tree_digest(demo)
    assert tree_digest(other) != tree_digest(demo)
    assert load(other, "pretrain") != load(demo, "pretrain")
    assert load(other, "heldout") != load(demo, "heldout")


def test_reuse_and_regeneration(tmp_path):
    out = str(tmp_path / "d")
    sizes = dict(n_pretrain=6, n_sft=6, n_multi=3, n_heldout=6)
    ds.generate_demo_data(out, **sizes)
    marker = os.path.join(out, "pretrain_data.jsonl")
    with open(marker, "a", encoding="utf-8") as f:
        f.write("")  # keep contents; we watch the mtime
    os.utime(marker, (1, 1))
    ds.generate_demo_data(out, **sizes)
    assert os.path.getmtime(marker) == 1, "complete output with the same settings must be reused"
    ds.generate_demo_data(out, **sizes, force=True)
    assert os.path.getmtime(marker) != 1
    ds.generate_demo_data(out, **{**sizes, "n_pretrain": 4})
    assert len(load(out, "pretrain")) == 4
    assert len(os.listdir(os.path.join(out, "pretrain_images"))) == 4, "stale pictures left behind"
    with open(os.path.join(out, ds.MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["version"] == ds.VERSION and manifest["seed"] == 0 and manifest["n_pretrain"] == 4


# ----------------------------------------------------------------------------- format

def check_conversation(conv, n_images):
    assert len(conv) >= 2 and len(conv) % 2 == 0
    for i, turn in enumerate(conv):
        assert set(turn) == {"from", "value"}
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
        assert turn["value"].strip()
        if turn["from"] == "gpt":
            assert "<image>" not in turn["value"]
    assert sum(t["value"].count("<image>") for t in conv) == n_images
    assert conv[0]["value"].count("<image>") == n_images  # all marks in the first question


@pytest.mark.parametrize("name", list(ds.FILES))
def test_records_and_images_match_the_original_format(demo, name):
    records = load(demo, name)
    assert len(records) == SMALL[{"pretrain": "n_pretrain", "sft": "n_sft", "sft_multi": "n_multi",
                                  "heldout": "n_heldout"}[name]]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        paths = image_paths(demo, name, r)
        if name == "sft_multi":
            assert len(paths) == 2 and ", " in r["image"]
        check_conversation(r["conversations"], len(paths))
        if name == "pretrain":
            assert len(r["conversations"]) == 2
            assert r["conversations"][0]["value"].startswith("<image>\n")
        if name == "heldout":
            assert r["qtype"] in ds.HELDOUT_QTYPES
            assert r["question"] == r["conversations"][0]["value"]
            assert r["answer"] == r["conversations"][1]["value"]
            assert r["question"].count("<image>") == len(paths) == (2 if r["qtype"] == "multi" else 1)
        for p in paths:
            with Image.open(p) as img:
                assert img.size == (224, 224) and img.mode == "RGB"
    used = {os.path.basename(p) for r in records for p in image_paths(demo, name, r)}
    assert set(os.listdir(os.path.join(demo, ds.FILES[name][1]))) == used


def test_sft_sets_ask_about_the_pretrain_pictures(demo):
    """The SFT sets link pretrain pictures, so their features are encoded once for all stages;
    a new picture is drawn only when the pool has none with the wanted attributes."""
    pretrain = os.path.realpath(os.path.join(demo, ds.FILES["pretrain"][1]))
    for name in ("sft", "sft_multi"):
        folder = os.path.join(demo, ds.FILES[name][1])
        files = os.listdir(folder)
        linked = [f for f in files if os.path.islink(os.path.join(folder, f))]
        assert len(linked) > len(files) / 2, (name, len(linked), len(files))
        for f in linked:
            assert os.path.dirname(os.path.realpath(os.path.join(folder, f))) == pretrain
            assert f.startswith("pretrain_")


@pytest.mark.parametrize("name", ["pretrain", "sft"])
def test_pictures_show_the_stated_colour(demo, name):
    """The dominant non-background colour of a picture is the one its answers name."""
    checked = 0
    for r in load(demo, name)[:80]:
        colours = set(ds.colours_in(" ".join(t["value"] for t in r["conversations"][1::2])))
        if not colours:  # an SFT record that never asks about colour
            continue
        (colour,) = colours
        checked += 1
        with Image.open(image_paths(demo, name, r)[0]) as img:
            counts = sorted(img.getcolors(224 * 224), reverse=True)
        shape_rgb = counts[1][1]  # the background fills most of the picture
        assert all(abs(a - b) <= ds.COLOUR_JITTER for a, b in zip(shape_rgb, ds.COLOURS[colour]))
    assert checked >= 20


def test_shapes_never_overlap_and_stay_inside():
    rng = random.Random(0)
    for _ in range(2000):
        scene = ds.sample_scene(rng)
        boxes = []
        for cx, cy, size in scene["items"]:
            pts = ds.shape_polygon(scene["shape"], cx, cy, size)
            xs, ys = (pts[0::2], pts[1::2]) if scene["shape"] == "圆形" else zip(*pts)
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 and 0 <= y0 and x1 < 224 and y1 < 224
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (scene, a, b)


def test_heldout_pictures_never_appear_in_training(demo):
    def digests(name):
        folder = os.path.join(demo, ds.FILES[name][1])
        out = set()
        for fn in os.listdir(folder):
            with Image.open(os.path.join(folder, fn)) as img:
                out.add(hashlib.md5(img.tobytes()).hexdigest())
        return out

    train = set().union(*(digests(n) for n in TRAIN_SETS))
    assert train and not digests("heldout") & train


def test_attribute_coverage(demo):
    colours, shapes, positions, counts = set(), set(), set(), set()
    for name in TRAIN_SETS:
        for r in load(demo, name):
            for turn in r["conversations"][1::2]:
                colours |= set(ds.colours_in(turn["value"]))
                shapes |= set(ds.shapes_in(turn["value"]))
                positions |= set(ds.positions_in(turn["value"]))
                counts |= set(ds.counts_in(turn["value"]))
    assert len(colours) >= 6 and colours == set(ds.COLOURS)
    assert shapes == set(ds.SHAPES) and positions == set(ds.POSITIONS) and counts == {1, 2, 3}

    heldout = load(demo, "heldout")
    assert {r["qtype"] for r in heldout} == set(ds.HELDOUT_QTYPES)
    assert {r["attrs"]["mtype"] for r in heldout if r["qtype"] == "multi"} == set(ds.MULTI_QUESTIONS)
    singles = [r["attrs"] for r in heldout if r["qtype"] != "multi"]
    assert {a["count"] for a in singles} == {1, 2, 3}
    assert len({a["colour"] for a in singles}) >= 5 and {a["shape"] for a in singles} == set(ds.SHAPES)
    # Comparison answers describe both pictures, then conclude, both ways.
    multi_answers = [t["value"] for r in load(demo, "sft_multi") for t in r["conversations"][1::2]
                     if "第一张" in t["value"]]
    assert any(a.endswith("，一样。") for a in multi_answers)
    assert any(a.endswith("，不一样。") for a in multi_answers)
    # "Which" answers first repeat what they look for.
    assert any(a.startswith("要找") and a.endswith("所以是第一张图片。") for a in multi_answers)
    assert any(a.endswith("所以是第二张图片。") for a in multi_answers)


# ----------------------------------------------------------------------------- scoring

def rec(qtype, **attrs):
    base = {"colour": "红色", "shape": "圆形", "count": 1, "position": "左上"}
    return {"qtype": qtype, "attrs": {**base, **attrs}}


def multi(mtype, a, b, target=None):
    full = [{"colour": "红色", "shape": "圆形", "count": 1, "position": None, **x} for x in (a, b)]
    attrs = {"mtype": mtype, "images": full}
    if target is not None:
        attrs["target"] = target
    return {"qtype": "multi", "attrs": attrs}


def test_score_accepts_every_reference_answer(demo):
    for r in load(demo, "heldout"):
        assert ds.score_answer(r, r["answer"]), r


def test_score_rejects_a_wrong_colour_in_every_reference(demo):
    for r in load(demo, "heldout"):
        if r["qtype"] not in ("caption", "colour"):
            continue
        right = r["attrs"]["colour"]
        wrong = next(c for c in ds.COLOURS if c != right)
        assert not ds.score_answer(r, r["answer"].replace(right, wrong))
        assert not ds.score_answer(r, r["answer"].replace(right, f"{right}和{wrong}"))


@pytest.mark.parametrize("record, good, bad", [
    (rec("colour"), ["红色。", "是红的", "红色"], ["蓝色。", "红色和蓝色。", "", "圆形。"]),
    (rec("shape", shape="正方形"), ["正方形。", "方形", "是一个正方形"], ["圆形。", "三角形。", "圆形或正方形"]),
    (rec("shape", shape="三角形"), ["三角形。"], ["正方形。"]),
    (rec("position", position="中间"), ["中间。", "在图片中央"], ["左上角。", "右下", "中间偏左上"]),
    (rec("count", count=3), ["三个。", "3个", "一共有三个形状"], ["两个。", "一个三角形", "2", "三四个"]),
    (rec("count", count=1, shape="三角形"), ["一个。"], ["三个。"]),
    (rec("caption", colour="紫色", shape="三角形", count=1, position="右下"),
     ["图中有一个紫色的三角形，位于右下角。", "一个紫色三角形"],
     ["图中有一个蓝色的三角形，位于右下角。", "图中有一个紫色的圆形，位于右下角。",
      "图中有两个紫色的三角形。", "图中有一个紫色的三角形，位于左上角。", "紫色的三角形", "三角形。"]),
    (rec("caption", colour="黄色", shape="正方形", count=2, position=None),
     ["图中有两个黄色的正方形。"], ["图中有两个黄色的正方形，位于中间。", "图中有三个黄色的正方形。",
                            "图中有两个黄色和绿色的正方形。"]),
    (multi("which", {}, {"colour": "蓝色"}, target=1),
     ["第二张图片。", "第2张", "第一张是红色的圆形，第二张是蓝色的圆形，所以是第二张图片。"],
     ["第一张图片。", "两张都有。", "第一张和第二张", "", "第一张是红色的圆形，第二张是蓝色的圆形，所以是第一张图片。"]),
    (multi("same_shape", {"shape": "三角形"}, {"shape": "三角形"}),
     ["一样，都是三角形。", "相同", "第一张是三角形，第二张是三角形，一样。"],
     ["不一样，第一张是三角形，第二张是圆形。", "一样，都是圆形。", "三角形", "第一张是三角形，第二张是三角形，不一样。"]),
    (multi("same_shape", {"shape": "圆形"}, {"shape": "正方形"}),
     ["不一样，第一张是圆形，第二张是正方形。", "不一样。", "第一张是圆形，第二张是正方形，不一样。"],
     ["一样，都是圆形。", "不一样，第一张是正方形，第二张是圆形。", "第一张是圆形，第二张是圆形，一样。"]),
    (multi("same_colour", {"colour": "红色"}, {"colour": "绿色"}),
     ["不一样，第一张是红色，第二张是绿色。"], ["一样，都是红色。", "不一样，第一张是绿色，第二张是红色。"]),
    (multi("same_count", {"count": 2}, {"count": 2}), ["一样，都有两个。", "第一张有两个，第二张有两个，一样。"],
     ["不一样。", "一样，都有三个。", "第一张有两个，第二张有三个，一样。"]),
    (multi("same_count", {"count": 1}, {"count": 3}),
     ["不一样，第一张有一个，第二张有三个。", "不一样，第1张有1个，第2张有3个"], ["一样，都有一个。", "不一样，第一张有三个，第二张有一个。"]),
])
def test_score_answer_cases(record, good, bad):
    for text in good:
        assert ds.score_answer(record, text), text
    for text in bad:
        assert not ds.score_answer(record, text), text


# ----------------------------------------------------------------------------- demo CLIP

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return ds.make_demo_clip(str(tmp_path_factory.mktemp("clip") / "demo-clip"), seed=0, hidden_size=128)


def test_demo_clip_loads_like_the_real_folder(clip_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModel

    for fn in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(clip_dir, fn))
    with open(os.path.join(clip_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "clip" and "text_config" in cfg
    assert cfg["vision_config"]["patch_size"] == 32 and cfg["vision_config"]["image_size"] == 224

    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    # Every vision weight really comes from the file (nothing silently re-initialised).
    saved = load_file(os.path.join(clip_dir, "model.safetensors"))
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key in saved else "vision_model." + key  # key layout differs across versions
        assert torch.equal(value, saved[name]), key

    scene = ds.sample_scene(random.Random(0), count=1)
    x = proc(images=ds.render_scene(scene), return_tensors="pt")["pixel_values"]
    assert tuple(x.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        feats = model(pixel_values=x).last_hidden_state
    assert tuple(feats.shape) == (1, 50, 128)
    assert torch.isfinite(feats).all()


def clip_features(clip_dir, scenes):
    """Last-layer tokens [N, 50, width] of the demo CLIP for rendered `scenes`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = CLIPImageProcessor.from_pretrained(clip_dir)(images=[ds.render_scene(s) for s in scenes],
                                                     return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def test_demo_clip_features_tell_pictures_apart(clip_dir):
    rng = random.Random(1)
    spread = clip_features(clip_dir, [ds.sample_scene(rng) for _ in range(16)]).std(0).mean().item()
    assert spread > 0.1, f"features barely change between pictures (std {spread:.3f})"

    red = ds.sample_scene(random.Random(2), count=1, colour="红色", shape="圆形", position="中间")
    variants = [red, dict(red, colour="蓝色", rgb=ds.COLOURS["蓝色"]),
                dict(red, colour="橙色", rgb=ds.COLOURS["橙色"]), dict(red, shape="正方形")]
    f = clip_features(clip_dir, variants)
    for other in f[1:]:
        rel = ((f[0] - other).norm() / f[0].norm()).item()
        assert rel > 0.05, rel
        # The change sits on the patches the shape covers, and is large there.
        per_token = (f[0] - other).norm(dim=-1) / f[0].norm(dim=-1)
        assert per_token.max().item() > 0.3


def test_demo_clip_tokens_carry_their_position(clip_dir):
    """A shape moved right by exactly three patches: the tokens show the same patches in another
    order, so without position embeddings (CLIP's 0.02 init is ~1% of a patch) their mean hardly
    changes (see docs/demo_notes.md). The demo CLIP's tokens must say where they are."""
    base = ds.sample_scene(random.Random(3), count=1, colour="红色", shape="圆形", position="左上")
    moved = dict(base, items=[(cx + 96, cy, size) for cx, cy, size in base["items"]])
    blue = dict(base, colour="蓝色", rgb=ds.COLOURS["蓝色"])
    pooled = clip_features(clip_dir, [base, moved, blue]).mean(dim=1)
    moved_change, colour_change = ((pooled[0] - pooled[k]).norm().item() for k in (1, 2))
    assert moved_change > 0.1 * colour_change, (moved_change, colour_change)


def test_demo_clip_is_seeded_and_reused(clip_dir, tmp_path):
    from safetensors.torch import load_file
    import torch

    again = ds.make_demo_clip(str(tmp_path / "again"), seed=0, hidden_size=128)
    other = ds.make_demo_clip(str(tmp_path / "other"), seed=1, hidden_size=128)
    a, b, c = (load_file(os.path.join(p, "model.safetensors")) for p in (clip_dir, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vision_model.embeddings.patch_embedding.weight"],
                           c["vision_model.embeddings.patch_embedding.weight"])
    weights = os.path.join(again, "model.safetensors")
    os.utime(weights, (1, 1))
    ds.make_demo_clip(again, seed=0, hidden_size=128)
    assert os.path.getmtime(weights) == 1
    ds.make_demo_clip(again, seed=0, hidden_size=128, force=True)
    assert os.path.getmtime(weights) != 1
    ds.make_demo_clip(again, seed=0, hidden_size=64)  # other settings: rebuilt, not reused
    assert load_file(weights)["vision_model.post_layernorm.weight"].shape == (64,)


def test_rehearsal_mixes_single_picture_records_into_the_multi_set(tmp_path):
    out = tmp_path / "demo"
    ds.generate_demo_data(str(out), seed=0, n_pretrain=2, n_sft=2, n_multi=4, n_heldout=6, n_rehearsal=3)
    records = load(str(out), "sft_multi")
    singles = [r for r in records if "," not in r["image"]]
    assert len(records) == 7 and len(singles) == 3
    for r in singles:
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert os.path.exists(os.path.join(str(out), ds.FILES["sft_multi"][1], r["image"]))


def test_pretrain_target_needs_colour_and_shape_only():
    r = rec("caption", colour="紫色", shape="三角形", count=2)
    assert ds.names_colour_and_shape(r, "图中有三个紫色的三角形。")        # count wrong: still named
    assert not ds.names_colour_and_shape(r, "图中有两个紫色的圆形。")
    assert not ds.names_colour_and_shape(r, "图中有两个蓝色的三角形。")
    assert not ds.names_colour_and_shape(r, "图中有两个紫色和蓝色的三角形。")


def test_command_line_writes_data_and_clip(tmp_path, capsys):
    out, clip = tmp_path / "demo", tmp_path / "clip"
    demo_shapes_cli(["--out_dir", str(out), "--n_pretrain", "3", "--n_sft", "3", "--n_multi", "2", "--n_rehearsal", "1",
             "--n_heldout", "6", "--clip_path", str(clip), "--clip_hidden_size", "64"])
    assert "rehearsal" in capsys.readouterr().out
    multi = load(str(out), "sft_multi")
    assert len(multi) == 3 and sum("," in r["image"] for r in multi) == 2    # 2 pairs + 1 single
    assert json.load(open(clip / "config.json"))["vision_config"]["hidden_size"] == 64


# ----------------------------------------------------------------------------- clips

CLIP_SIZES = dict(n_train=40, n_heldout=20)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clips"))
    ds.generate_clip_data(out, seed=0, **CLIP_SIZES)
    return out


def load_clips(out_dir, name):
    with open(os.path.join(out_dir, ds.CLIP_FILES[name][0]), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def clip_path(out_dir, name, record):
    return os.path.join(out_dir, ds.CLIP_FILES[name][1], record["video"])


def centroids(frames):
    """(x, y) centre of each frame's shape: the pixels far from the frame's background (its corner)."""
    import numpy as np

    out = []
    for frame in frames:
        a = np.asarray(frame, dtype=np.int16)
        ys, xs = np.nonzero(np.abs(a - a[2, 2]).sum(axis=2) > 60)
        out.append((xs.mean(), ys.mean()))
    return out


def assert_same_clip_sets(a, b):
    """Same files; every file but a clip byte for byte; a clip's decoded frames within one grey
    level on average of each other's. libx264 on several threads does not always write the same
    bytes for the same frames (seen under load), and now and then not the same pixels either:
    a clip is the same clip within what its encoding changes anyway (a shape moved by a single
    pixel changes far more)."""
    import numpy as np

    from model.video import read_keyframes

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    assert files(a) == files(b)
    for name in files(a):
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".mp4"):
            for fa, fb in zip(read_keyframes(pa, ds.clips.FRAMES), read_keyframes(pb, ds.clips.FRAMES), strict=True):
                diff = np.abs(np.asarray(fa, dtype=np.int16) - np.asarray(fb, dtype=np.int16))
                assert diff.mean() <= 1.0, name
        else:
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                assert fa.read() == fb.read(), name


def test_clips_same_seed_same_frames_other_seed_differs(clips, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    ds.generate_clip_data(again, seed=0, **CLIP_SIZES)
    ds.generate_clip_data(other, seed=1, **CLIP_SIZES)
    assert_same_clip_sets(again, clips)
    assert load_clips(other, "video") != load_clips(clips, "video")
    assert load_clips(other, "video_heldout") != load_clips(clips, "video_heldout")


def test_clip_set_rehearses_two_picture_records(tmp_path):
    """Rehearsal records are the two-picture set's own, and their pictures load from the clip
    folder as the same pictures."""
    from PIL import ImageChops

    out = str(tmp_path / "d")
    ds.generate_demo_data(out, n_pretrain=12, n_sft=6, n_multi=8, n_heldout=6, n_rehearsal=4)
    ds.generate_clip_data(out, n_train=3, n_heldout=2, n_rehearsal=5)
    multi = [json.loads(line) for line in open(os.path.join(out, ds.FILES["sft_multi"][0]), encoding="utf-8")]
    train = load_clips(out, "video")
    pictures = [r for r in train if "image" in r]
    assert len(train) == 8 and len(pictures) == 5 and all(r in multi for r in pictures)
    for r in pictures:
        for name in r["image"].split(", "):
            with Image.open(os.path.join(out, ds.CLIP_FILES["video"][1], name)) as a, \
                    Image.open(os.path.join(out, ds.FILES["sft_multi"][1], name)) as b:
                assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def test_clips_are_reused_and_leave_the_pictures_alone(tmp_path):
    out = str(tmp_path / "d")
    ds.generate_demo_data(out, n_pretrain=6, n_sft=6, n_multi=3, n_heldout=6)
    pictures = tree_digest(out)
    ds.generate_clip_data(out, n_train=3, n_heldout=2)
    data = os.path.join(out, ds.CLIP_FILES["video"][0])
    os.utime(data, (1, 1))
    ds.generate_clip_data(out, n_train=3, n_heldout=2)
    assert os.path.getmtime(data) == 1, "complete output with the same settings must be reused"
    ds.generate_clip_data(out, n_train=2, n_heldout=2)
    assert len(os.listdir(os.path.join(out, ds.CLIP_FILES["video"][1]))) == 2, "stale clips left behind"
    for data, folder in ds.CLIP_FILES.values():
        os.remove(os.path.join(out, data))
        shutil.rmtree(os.path.join(out, folder))
    os.remove(os.path.join(out, "video_manifest.json"))
    assert tree_digest(out) == pictures


@pytest.mark.parametrize("motion", list(ds.MOTIONS))
def test_each_clip_moves_its_shape_the_stated_way(motion, tmp_path):
    """Decoded keyframes: the shape's centre goes most of the way across the picture in the
    stated direction and stays put across it (a still shape does not move at all)."""
    from demo_shapes.clips import save_clip
    from model.video import read_keyframes

    dx, dy = ds.MOTIONS[motion]
    rng = random.Random(motion)
    for i in range(4):
        clip = ds.sample_clip(rng, motion=motion)
        save_clip(str(tmp_path), f"{i}.mp4", ds.render_clip(clip))
        xs, ys = zip(*centroids(read_keyframes(str(tmp_path / f"{i}.mp4"), 4)))
        for along, d in ((xs, dx), (ys, dy)):
            steps = [b - a for a, b in zip(along, along[1:])]
            if d == 0:
                assert max(along) - min(along) < 2, (motion, along)
            else:
                assert all(d * s > 10 for s in steps), (motion, along)
                assert d * (along[-1] - along[0]) > 60, (motion, along)


def test_clip_records_match_their_clips(clips):
    """Each held-out clip's stated motion, places and shape are what its keyframes show."""
    from demo_shapes.clips import where
    from model.video import read_keyframes

    heldout = load_clips(clips, "video_heldout")
    assert {r["qtype"] for r in heldout} == set(ds.CLIP_QTYPES)
    assert {r["attrs"]["motion"] for r in heldout} == set(ds.MOTIONS)
    for r in heldout:
        xs, ys = zip(*centroids(read_keyframes(clip_path(clips, "video_heldout", r), 4)))
        moved = (round((xs[-1] - xs[0]) / 60), round((ys[-1] - ys[0]) / 60))
        dx, dy = ds.MOTIONS[r["attrs"]["motion"]]
        assert (max(-1, min(1, moved[0])), max(-1, min(1, moved[1]))) == (dx, dy), (r, xs, ys)
        # The places the answers describe are where the decoded first and last keyframes show it
        # (unless its centre of mass, which for a triangle is off the centre, is near a line between thirds).
        for k, said in ((0, r["attrs"]["first"]), (-1, r["attrs"]["last"])):
            if all(abs(c - line) > 16 for c in (xs[k], ys[k]) for line in (224 / 3, 448 / 3)):
                assert where(xs[k], ys[k]) == said, (r, xs, ys)
        if r["qtype"] == "direction":
            assert ds.motions_in(r["answer"]) == [r["attrs"]["motion"]]
        else:
            assert ds.shapes_in(r["answer"]) == [r["attrs"]["shape"]]


def test_heldout_clips_never_appear_in_training(clips, monkeypatch):
    from demo_shapes import clips as clip_module
    from demo_shapes.clips import frames_digest
    from model.video import read_keyframes

    def digests(name):
        folder = os.path.join(clips, ds.CLIP_FILES[name][1])
        return {hashlib.md5(b"".join(f.tobytes() for f in read_keyframes(os.path.join(folder, fn), 8))).hexdigest()
                for fn in os.listdir(folder)}

    train = digests("video")
    assert len(train) == CLIP_SIZES["n_train"] and not digests("video_heldout") & train
    # A held-out clip identical to a training one is drawn again, deterministically: forbid the
    # clips the held-out stream draws first, and each is replaced by another of the same motion.
    saved = []
    monkeypatch.setattr(clip_module, "save_clip", lambda folder, name, frames: saved.append(frames_digest(frames)))
    drawn = clip_module._gen_heldout("unused", 0, 5, forbidden=set())
    first, saved[:] = list(saved), []
    redrawn = clip_module._gen_heldout("unused", 0, 5, forbidden=set(first))
    assert [r["attrs"]["motion"] for r in redrawn] == [r["attrs"]["motion"] for r in drawn]
    assert len(set(saved)) == 5 and not set(saved) & set(first)


def pixels(images):
    """The pictures as they are, [N, 3, H, W] (the dataset's preprocess contract)."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def test_clip_records_load_as_keyframes(clips):
    """The training records go through the trainers' dataset: one clip, 4 keyframes, introduced
    as frames of one clip."""
    from dataset.vlm_dataset import VLMDataset
    from model.config import IMAGE_PLACEHOLDER_IDS
    from model.prompt import count_placeholders, load_tokenizer

    tokenizer = load_tokenizer()
    data = os.path.join(clips, ds.CLIP_FILES["video"][0])
    dataset = VLMDataset(data, os.path.join(clips, ds.CLIP_FILES["video"][1]), tokenizer, IMAGE_PLACEHOLDER_IDS,
                         max_images=4, frames=4, preprocess=pixels)
    assert len(dataset) == CLIP_SIZES["n_train"] and not dataset.problems
    for i in range(5):
        sample = dataset[i]
        assert sample["n_images"] == 4
        assert count_placeholders(sample["input_ids"].tolist(), IMAGE_PLACEHOLDER_IDS) == 4
        assert "以下是一段视频按时间顺序的4帧" in tokenizer.decode(sample["input_ids"].tolist())
        assert sample["pixel_values"].shape == (4, 3, 224, 224)


def test_score_clip_answers(clips):
    for r in load_clips(clips, "video_heldout"):
        assert ds.score_answer(r, r["answer"]), r
        if r["qtype"] == "direction":
            for wrong in ds.MOTIONS:
                if wrong != r["attrs"]["motion"]:
                    reference = "没有移动。" if wrong == "没有移动" else f"{wrong}移动。"
                    assert not ds.score_answer(r, reference), (r, wrong)


@pytest.mark.parametrize("motion, good, bad", [
    ("从左往右", ["从左往右移动。", "从左向右", "向右移动了", "它从左到右移动"],
     ["从右往左移动。", "没有移动。", "从左往右，又从右往左", "向上", "", "圆形。"]),
    ("从下往上", ["从下往上移动。", "往上走"], ["从上往下移动。", "向下"]),
    ("没有移动", ["没有移动。", "静止不动", "它没动"], ["从左往右移动。", "向左"]),
])
def test_score_direction_cases(motion, good, bad):
    record = {"qtype": "direction", "attrs": {"motion": motion, "shape": "圆形", "colour": "红色"}}
    for text in good:
        assert ds.score_answer(record, text), text
    for text in bad:
        assert not ds.score_answer(record, text), text
