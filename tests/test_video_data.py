"""Clips as training data: a record's `<video>` becomes N keyframes (JSON/JSONL with the clip in
the images folder, or Parquet with the clip's bytes in the row), bad clips are bad records, and
the feature cache keys each keyframe by (clip, index, N)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import common, losses, run_stage
from dataset.vlm_dataset import Skipped, VLMDataset
from model.config import IMAGE_PLACEHOLDER_IDS
from model.prompt import clip_text, count_placeholders
from model.video import write_video

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]


def clip(colours, path=None):
    """A clip whose frame k is a flat picture of colours[k]; its bytes, or written to `path`."""
    frames = [np.full((224, 224, 3), c, dtype=np.uint8) for c in colours]
    if path is not None:
        write_video(frames, str(path))
        return path.name
    import io
    out = io.BytesIO()
    write_video(frames, out)
    return out.getvalue()


def video_record(i, name, question="<video>\n形状往哪个方向移动？", answer="从左往右移动。", **extra):
    return {"id": i, "video": name, **extra,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    return folder


def pixels_of(images):
    """Each picture's mean colour: enough to tell which keyframe it was."""
    return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean(axis=(0, 1))) for im in images])[:, :, None, None]


def dataset(tokenizer, data, images_dir, **kw):
    return VLMDataset(str(data), images_dir and str(images_dir), tokenizer, IMAGE_PLACEHOLDER_IDS,
                      max_images=kw.pop("max_images", 8), preprocess=pixels_of, **kw)


def test_json_clip_becomes_its_keyframes(tmp_path, videos, tokenizer):
    name = clip(COLOURS * 2, videos / "c.mp4")   # 8 frames: keyframes of 4 are frames 1, 3, 5, 7
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    rows = [video_record(0, name), video_record(1, name, frames=2), video_record(2, "broken.mp4"),
            video_record(3, name, question="没有标记"), video_record(4, "../c.mp4")]
    data = tmp_path / "v.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    ds = dataset(tokenizer, data, videos, frames=4)
    first, second, broken = ds[0], ds[1], ds[2]
    assert first["n_images"] == 4 and count_placeholders(first["input_ids"].tolist(), IMAGE_PLACEHOLDER_IDS) == 4
    assert first["pixel_values"][:, 1, 0, 0].tolist() == pytest.approx([200, 220, 200, 220], abs=12)   # green, yellow, ...
    assert "以下是一段视频" in tokenizer.decode(first["input_ids"].tolist())
    assert second["n_images"] == 2                   # the record's own "frames"
    assert isinstance(broken, Skipped) and broken.reason.startswith("video cannot be decoded")
    reasons = [reason for _, reason in ds.problems]
    assert any("video mark count mismatch" in r for r in reasons)
    assert any("outside the images folder" in r for r in reasons)
    too_many = dataset(tokenizer, data, videos, frames=4, max_images=3)
    assert len(too_many) == 1 and too_many[0]["n_images"] == 2   # --max_images bounds keyframes


def test_parquet_clip_in_the_row(tmp_path, tokenizer):
    turns = [{"role": "user", "content": "视频里是什么颜色？<video>"}, {"role": "assistant", "content": "红色。"}]
    table = pa.table({"conversations": [json.dumps(turns, ensure_ascii=False)] * 2,
                      "video_bytes": pa.array([clip(COLOURS), b"\x00\x01 garbage"], pa.binary()),
                      "frames": pa.array([2, 2], pa.int64())})
    pq.write_table(table, tmp_path / "v.parquet")
    ds = dataset(tokenizer, tmp_path / "v.parquet", None)
    item, bad = ds[0], ds[1]
    assert item["n_images"] == 2 and item["pixel_values"][:, 0, 0, 0].tolist() == pytest.approx([30, 230], abs=12)
    assert isinstance(bad, Skipped) and bad.reason.startswith("video cannot be decoded")
    assert clip_text(2).split("\n")[0] in tokenizer.decode(item["input_ids"].tolist())


def test_sft_trains_on_clips_live_and_cached(tmp_path, videos, tiny_clip_dir):
    names = [clip([COLOURS[(i + k) % 4] for k in range(4)], videos / f"{i}.mp4") for i in range(4)]
    data = tmp_path / "videos.jsonl"
    data.write_text("\n".join(json.dumps(video_record(i, names[i % 4], answer=f"第{i % 4}段。"), ensure_ascii=False)
                              for i in range(16)), encoding="utf-8")
    live, cached = tmp_path / "live", tmp_path / "cached"
    steps = ("--from_scratch", "--max_steps", "3")
    run_stage("sft", common((str(data), str(videos)), tiny_clip_dir, live, *steps))
    run_stage("sft", common((str(data), str(videos)), tiny_clip_dir, cached, *steps, "--cache_features"))
    assert losses(cached / "64_vlm_sft.pth") == pytest.approx(losses(live / "64_vlm_sft.pth"), abs=2e-3)
    (folder,) = (cached / "feature_cache").iterdir()
    assert len(np.load(folder / "keys.npy")) == 16   # 4 clips x 4 keyframes, each encoded once


def test_data_checks_count_a_clips_keyframes_as_training_would(tmp_path, videos, tiny_clip_dir, capsys):
    """scripts/check_data.py and --check_data take --frames: 8 keyframes of 50 tokens do not fit
    in 300 tokens where 4 do. check_data.py's limits default to the trainers' own."""
    from scripts.check_data import main as check_main

    name = clip(COLOURS, videos / "c.mp4")
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps(video_record(0, name), ensure_ascii=False), encoding="utf-8")
    script = ["--data_path", str(data), "--images_dir", str(videos), "--max_seq_len", "300"]
    assert check_main(script + ["--frames", "4"]) == 0
    assert check_main(script + ["--frames", "8"]) == 1
    assert "longer than max_seq_len=300" in capsys.readouterr().out
    trainer = common((str(data), str(videos)), tiny_clip_dir, tmp_path / "out", "--check_data", "--max_seq_len", "300")
    assert run_stage("sft", trainer + ["--frames", "4"]) == 0
    assert run_stage("sft", trainer + ["--frames", "8"]) == 1

    long_answer = video_record(1, name, answer="从左往右移动。" * 55)   # about 570 tokens with 4 keyframes
    data.write_text(json.dumps(long_answer, ensure_ascii=False), encoding="utf-8")
    assert run_stage("sft", trainer[:-2]) == 0                     # the trainers' default --max_seq_len
    assert check_main(script[:-2]) == 0                            # the same default
    assert check_main(script[:-2] + ["--max_seq_len", "512"]) == 1
