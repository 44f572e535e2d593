"""Chatting about a clip: the CLI's --video and the web page's video upload ask through the
clip's keyframes, introduced as frames of one clip; a file that is not a usable clip is one line
and the other inputs are still answered."""
import io
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli, save_tiny_checkpoint
from model import inference as inf
from model.config import IMAGE_PLACEHOLDER_IDS
from model.prompt import clip_text, count_placeholders
from model.video import read_keyframes, write_video

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20), (200, 200, 200), (20, 20, 20)]


def clip_bytes(n=6):
    out = io.BytesIO()
    write_video([np.full((64, 64, 3), COLOURS[k % len(COLOURS)], dtype=np.uint8) for k in range(n)], out)
    return out.getvalue()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_tiny_checkpoint(folder / "64_vlm_sft.pth")
    return str(folder)


def test_a_clip_prompt_introduces_its_keyframes(tokenizer):
    ids = inf.build_prompt_ids(tokenizer, "发生了什么？", 3, clip=True)
    assert count_placeholders(ids, IMAGE_PLACEHOLDER_IDS) == 3
    assert clip_text(3).split("\n")[0] in tokenizer.decode(ids)
    assert clip_text(3).split("\n")[0] not in tokenizer.decode(inf.build_prompt_ids(tokenizer, "?", 3))


def test_cli_answers_clips_and_skips_bad_files(tmp_path, out_dir, tiny_clip_dir, tokenizer):
    (tmp_path / "good.mp4").write_bytes(clip_bytes())
    (tmp_path / "short.mp4").write_bytes(clip_bytes(2))
    (tmp_path / "notes.mp4").write_text("not a video")
    proc = run_cli("--weight", os.path.join(out_dir, "64_vlm_sft.pth"), "--vision_model", tiny_clip_dir,
                   "--video", str(tmp_path / "notes.mp4"), str(tmp_path / "good.mp4"), str(tmp_path / "short.mp4"),
                   "--frames", "3", "--json", "--temperature", "0", "--max_new_tokens", "8", "--prompt", "发生了什么？")
    assert proc.returncode == 0, proc.stderr
    complaints = proc.stderr.strip().splitlines()
    assert len(complaints) == 2 and all(line.startswith("skipped: ") for line in complaints)
    assert any("notes.mp4" in line for line in complaints)
    assert any("short.mp4" in line and "fewer than the 3 asked for" in line for line in complaints)
    (line,) = [json.loads(x) for x in proc.stdout.splitlines()]
    assert line["video"].endswith("good.mp4") and line["frames"] == 3
    model = inf.load_model(os.path.join(out_dir, "64_vlm_sft.pth"), tiny_clip_dir)
    frames = read_keyframes(str(tmp_path / "good.mp4"), 3)
    greedy = inf.Sampling(temperature=0, max_new_tokens=8)
    assert line["answer"] == inf.answer(model, tokenizer, frames, "发生了什么？", sampling=greedy, clip=True)

    # A folder stands for the clips in it, as --image takes a folder of pictures.
    (tmp_path / "pictures").mkdir()
    by_folder = run_cli("--weight", os.path.join(out_dir, "64_vlm_sft.pth"), "--vision_model", tiny_clip_dir,
                        "--video", str(tmp_path), str(tmp_path / "pictures"), "--frames", "3", "--json",
                        "--temperature", "0", "--max_new_tokens", "8", "--prompt", "发生了什么？")
    assert by_folder.returncode == 0 and by_folder.stdout == proc.stdout, by_folder.stderr
    assert by_folder.stderr.strip().splitlines()[-1].startswith(f"skipped: {tmp_path / 'pictures'} holds no clips (.mp4")


def test_cli_interactive_about_a_clip(tmp_path, out_dir, tiny_clip_dir):
    (tmp_path / "good.mp4").write_bytes(clip_bytes())
    proc = run_cli("--weight", os.path.join(out_dir, "64_vlm_sft.pth"), "--vision_model", tiny_clip_dir,
                   "--video", str(tmp_path / "good.mp4"), "--interactive", "--json", "--max_new_tokens", "6",
                   stdin="第一个问题\n第二个问题\n\n")
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["第一个问题", "第二个问题"] and answers[0]["frames"] == 4


def test_web_page_chats_about_an_uploaded_clip(out_dir, tiny_clip_dir, tokenizer, monkeypatch):
    from streamlit.testing.v1 import AppTest

    for key, value in {"MINIMIND_OUT_DIR": out_dir, "MINIMIND_VISION_MODEL": tiny_clip_dir,
                       "MINIMIND_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    at = AppTest.from_file(os.path.join(ROOT, "web_server.py"), default_timeout=60).run()
    at.slider(key="temperature").set_value(0.0)
    at.slider(key="max_new_tokens").set_value(16)
    at.slider(key="frames").set_value(3)
    at.file_uploader[1].upload("broken.mp4", b"not a video", "video/mp4").run()
    assert not at.exception and "broken.mp4" in at.error[0].value
    at.file_uploader[1].upload("clip.mp4", clip_bytes(), "video/mp4").run()
    assert not at.exception, at.exception
    assert len(at.get("image")[0].proto.imgs) == 3           # the keyframes it will use, shown
    at.chat_input[0].set_value("发生了什么？").run()
    assert not at.exception, at.exception
    model = inf.load_model(os.path.join(out_dir, "64_vlm_sft.pth"), tiny_clip_dir)
    expected = inf.answer(model, tokenizer, read_keyframes(clip_bytes(), 3), "发生了什么？",
                          sampling=inf.Sampling(temperature=0, max_new_tokens=16), clip=True)
    assert at.chat_message[1].markdown[0].value.strip() == expected.strip()
