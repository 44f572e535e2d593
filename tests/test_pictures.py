"""The one image loader: every path that reads a picture (training, feature cache, chat) sees
the same pixels, and anything that is not a picture is one clear line."""
import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from dataset.vlm_dataset import VLMDataset
from model.config import IMAGE_PLACEHOLDER_IDS
from model.vision import ImageError, ImagePreprocessor, VisionEncoder, load_image
from trainer.feature_cache import FeatureCache


def transparent_pictures(folder):
    """RGBA, LA and palette pictures whose left half is fully transparent over a colour."""
    rgba = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    rgba.paste((200, 30, 30, 0), (0, 0, 16, 32))          # transparent, but red underneath
    la = Image.new("LA", (32, 32), (90, 255))
    la.paste((90, 0), (0, 0, 16, 32))
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 40, 180, 60] + [0] * 762)
    palette.info["transparency"] = 1                      # colour 1 (green) is transparent
    paths = {}
    for name, image in [("rgba.png", rgba), ("la.png", la), ("p.png", palette)]:
        image.save(folder / name, **({"transparency": 1} if name == "p.png" else {}))
        paths[name] = str(folder / name)
    return paths


def test_alpha_is_dropped_as_the_original_did(tmp_path):
    paths = transparent_pictures(tmp_path)
    assert load_image(paths["rgba.png"]).getpixel((0, 0)) == (200, 30, 30)   # not white
    assert load_image(paths["la.png"]).getpixel((0, 0)) == (90, 90, 90)
    assert load_image(paths["p.png"]).getpixel((0, 0)) == (40, 180, 60)
    for source in (open(paths["rgba.png"], "rb"), (tmp_path / "rgba.png").read_bytes()):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(load_image(paths["rgba.png"])))


def test_anything_but_a_picture_is_one_line(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    for name, reason in [("notes.png", "is not a readable picture"), ("cut.png", "is not a readable picture"),
                         ("absent.png", "cannot be read")]:
        with pytest.raises(ImageError) as err:
            load_image(str(tmp_path / name))
        assert name in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImageError, match="picture bytes is not a readable picture"):
        load_image(b"\x89PNG not really")


def test_training_cache_and_chat_see_the_same_pixels(tmp_path, tiny_clip_dir, tokenizer):
    paths = transparent_pictures(tmp_path)
    records = tmp_path / "d.jsonl"
    records.write_text("\n".join(
        f'{{"image": "{name}", "conversations": [{{"from": "human", "value": "<image>"}}, '
        f'{{"from": "gpt", "value": "好"}}]}}' for name in paths), encoding="utf-8")
    preprocess = ImagePreprocessor.from_pretrained(tiny_clip_dir)
    ds = VLMDataset(str(records), str(tmp_path), tokenizer, IMAGE_PLACEHOLDER_IDS, preprocess=preprocess)
    training = torch.cat([ds[i]["pixel_values"] for i in range(len(ds))])

    spec = importlib.util.spec_from_file_location("eval_chat", f"{ROOT}/3-eval_chat.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    chat = preprocess([image for _, image in cli.load_pictures(list(paths.values()))])
    assert torch.equal(training, chat)

    encoder = VisionEncoder.from_pretrained(tiny_clip_dir)
    store = FeatureCache(str(tmp_path / "cache"), encoder).prepare(ds.source, "cpu", progress=False)
    cached = torch.cat([store.of(i) for i in range(len(ds))])
    torch.testing.assert_close(cached.float(), encoder(training).half().float())
