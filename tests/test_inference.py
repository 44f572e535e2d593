"""model/inference.py and the 3-eval_chat.py command line, on a tiny random checkpoint."""
import json
import os
import shutil
import warnings

import pytest
import torch

from conftest import EVAL, eval_picture, run_cli, save_tiny_checkpoint, tiny_config
from model import inference as inf
from model.vision import load_image
from model.prompt import count_placeholders

@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    save_tiny_checkpoint(folder / "64_vlm_sft.pth")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model(out_dir, tiny_clip_dir):
    return inf.load_model(os.path.join(out_dir, "64_vlm_sft.pth"), tiny_clip_dir)


def cli_args(out_dir, clip, *extra):
    return ["--out_dir", out_dir, "--dim", "64", "--vision_model", clip, "--json",
            "--temperature", "0", "--max_new_tokens", "6", *extra]


# -- resolving weights --------------------------------------------------------------------------
def test_weight_names_follow_the_original_file_names():
    assert inf.weight_path("sft", "out", "512") == os.path.join("out", "512_vlm_sft.pth")
    assert inf.weight_path("sft_multi", "o", "768_moe") == os.path.join("o", "768_moe_vlm_sft_multi.pth")
    assert inf.weight_path("pretrain", "out", "512") == os.path.join("out", "512_vlm_pretrain.pth")
    assert inf.weight_path("sft_video", "out/demo", "128") == os.path.join("out/demo", "128_vlm_sft_video.pth")
    assert inf.weight_path("my/weights.pth", "out", "512") == "my/weights.pth"


def test_resolve_weights(tmp_path):
    (tmp_path / "512_vlm_sft.pth").write_bytes(b"x")
    assert inf.resolve_weights("sft", str(tmp_path)) == str(tmp_path / "512_vlm_sft.pth")
    with pytest.raises(inf.UserError, match=r"512_vlm_pretrain\.pth.*demo\.py"):
        inf.resolve_weights("pretrain", str(tmp_path))
    export = tmp_path / "export"
    export.mkdir()
    with pytest.raises(inf.UserError, match="not a MiniMind-V weights folder"):
        inf.resolve_weights(str(export))
    (export / "config.json").write_text(json.dumps({"model_type": "minimind-v"}))
    assert inf.resolve_weights(str(export)) == str(export)


def test_find_checkpoints_lists_vlm_weights_and_exports_sft_first(tmp_path):
    for name in ["512_vlm_pretrain.pth", "512_vlm_sft.pth", "512_llm.pth", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "minimind-v-512-hf").mkdir()
    (tmp_path / "minimind-v-512-hf" / "config.json").write_text(json.dumps({"model_type": "minimind-v"}))
    (tmp_path / "other-hf").mkdir()
    for name in ["256_vlm_sft_multi.pth", "256_vlm_pretrain.pth"]:   # where the demo writes
        (tmp_path / "demo").mkdir(exist_ok=True)
        (tmp_path / "demo" / name).write_bytes(b"x")
    (tmp_path / "demo" / "deeper").mkdir()
    (tmp_path / "demo" / "deeper" / "1_vlm_sft.pth").write_bytes(b"x")
    names = [os.path.relpath(p, tmp_path) for p in inf.find_checkpoints(str(tmp_path))]
    assert names == ["512_vlm_sft.pth", os.path.join("demo", "256_vlm_sft_multi.pth"), "512_vlm_pretrain.pth",
                     os.path.join("demo", "256_vlm_pretrain.pth"), "minimind-v-512-hf"]
    assert inf.find_checkpoints(str(tmp_path / "missing")) == []


def test_vision_model_is_chosen_by_the_projector_width(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(inf, "DEFAULT_VISION_MODEL", str(tmp_path / "absent"))
    monkeypatch.setattr(inf, "V1_VISION_MODEL", str(tmp_path / "absent too"))
    monkeypatch.setattr(inf, "DEMO_VISION_MODEL", tiny_clip_dir)
    assert inf.choose_vision_model(32) == tiny_clip_dir          # the tiny CLIP is 32 wide
    assert inf.choose_vision_model(768) == str(tmp_path / "absent")
    monkeypatch.setattr(inf, "V1_VISION_MODEL", tiny_clip_dir)   # where v1's README put CLIP
    monkeypatch.setattr(inf, "DEMO_VISION_MODEL", str(tmp_path / "absent too"))
    assert inf.choose_vision_model(32) == tiny_clip_dir


# -- pictures -----------------------------------------------------------------------------------
def test_list_files_expands_folders(tmp_path):
    for name in ["b.png", "a.JPG", "c.txt", ".hidden.png", "d.MP4"]:
        (tmp_path / name).write_bytes(b"")
    listed = inf.list_files([str(tmp_path), "x.gif"])
    assert [os.path.basename(p) for p in listed] == ["a.JPG", "b.png", "x.gif"]
    assert [os.path.basename(p) for p in inf.list_files([str(tmp_path)], (".mp4",))] == ["d.MP4"]


# -- prompts and decoding -----------------------------------------------------------------------
def test_prompt_puts_one_placeholder_per_picture_in_the_first_kept_turn(tokenizer):
    image_ids = tiny_config().image_ids
    ids = inf.build_prompt_ids(tokenizer, "问题", 2)
    assert count_placeholders(ids, image_ids) == 2
    text = tokenizer.decode(ids)
    assert text.startswith("<s>user\n") and text.endswith("问题</s>\n<s>assistant\n")

    history = [{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "第一个回答"},
               {"role": "user", "content": "第二个问题"}, {"role": "assistant", "content": "第二个回答"}]
    full = inf.build_prompt_ids(tokenizer, "第三个问题", 1, history)
    assert count_placeholders(full, image_ids) == 1
    assert "第一个回答" in tokenizer.decode(full)
    # The picture stays at the start of the conversation, before the first question.
    assert full.index(image_ids[0]) < len(inf.build_prompt_ids(tokenizer, "第一个问题", 1))

    # Too long: the oldest exchange goes, the picture moves to the first kept question.
    cut = inf.build_prompt_ids(tokenizer, "第三个问题", 1, history, max_tokens=len(full) - 1)
    assert "第一个" not in tokenizer.decode(cut) and "第二个回答" in tokenizer.decode(cut)
    assert count_placeholders(cut, image_ids) == 1
    with pytest.raises(inf.UserError, match="too long"):
        inf.build_prompt_ids(tokenizer, "第三个问题", 1, history, max_tokens=10)


def test_decode_stream_never_splits_a_character(tokenizer):
    text = "图片里有两只可爱的海豚🐬在蓝色的海水中跳跃。"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    # The test means something only if some prefix ends inside a character.
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    pieces = list(inf.decode_stream(tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3


def test_streaming_equals_non_streaming(tiny_model, tokenizer):
    image = load_image(os.path.join(EVAL, eval_picture()))
    greedy = inf.Sampling(temperature=0, max_new_tokens=12)
    pieces = list(inf.stream_answer(tiny_model, tokenizer, [image], "这是什么？", sampling=greedy))
    text = inf.answer(tiny_model, tokenizer, [image], "这是什么？", sampling=greedy)
    assert len(pieces) > 1 and "".join(pieces) == text
    ids = torch.tensor([inf.build_prompt_ids(tokenizer, "这是什么？", 1)])
    tokens = tiny_model.generate(ids, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                                 pixel_values=tiny_model.vision_encoder.preprocess([image]))
    assert text == tokenizer.decode(tokens[0], skip_special_tokens=True)
    # The picture matters: another one gives another answer.
    other = load_image(os.path.join(EVAL, eval_picture(3)))
    assert inf.answer(tiny_model, tokenizer, [other], "这是什么？", sampling=greedy) != text


def test_sampling_is_seeded(tiny_model, tokenizer):
    image = load_image(os.path.join(EVAL, eval_picture()))
    hot = inf.Sampling(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=10)
    answers = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        answers.append(inf.answer(tiny_model, tokenizer, [image], "hi", sampling=hot))
    assert answers[0] == answers[1] != answers[2]


def test_load_model_errors_are_one_line(tmp_path, tiny_clip_dir, out_dir):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(inf.UserError, match="cannot read checkpoint"):
        inf.load_model(str(tmp_path / "bad.pth"), tiny_clip_dir)
    with pytest.raises(inf.UserError, match=r"vision model not found at .*nowhere.*demo\.py"):
        inf.load_model(os.path.join(out_dir, "64_vlm_sft.pth"), str(tmp_path / "nowhere"))


# -- the command line ---------------------------------------------------------------------------
def test_cli_answers_every_picture_and_skips_bad_files(out_dir, tiny_clip_dir, tmp_path, tiny_model, tokenizer):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(2):
        shutil.copy(os.path.join(EVAL, eval_picture(i)), pictures)
    (pictures / "broken.png").write_text("not a picture")
    result = run_cli(*cli_args(out_dir, tiny_clip_dir, "--image", str(pictures)))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    complaints = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert len(complaints) == 1 and "not a readable picture" in complaints[0]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [os.path.basename(r["image"]) for r in lines] == [eval_picture(0), eval_picture(1)]
    assert all(r["prompt"] == inf.DEFAULT_QUESTION for r in lines)
    # The CLI's greedy answer is the library's.
    image = load_image(os.path.join(EVAL, eval_picture(0)))
    expected = inf.answer(tiny_model, tokenizer, [image], inf.DEFAULT_QUESTION,
                          sampling=inf.Sampling(temperature=0, max_new_tokens=6))
    assert lines[0]["answer"] == expected


def test_cli_streams_text_by_default(out_dir, tiny_clip_dir):
    args = [a for a in cli_args(out_dir, tiny_clip_dir) if a != "--json"]
    result = run_cli(*args, "--image", os.path.join(EVAL, eval_picture()), "--prompt", "图里有什么？")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"[{eval_picture()}] 图里有什么？\n")


def test_cli_multi_asks_one_question_about_both_birds(out_dir, tiny_clip_dir, tmp_path):
    """As v1's --multi: the sft_multi weights, the two bird pictures, v1's question about them."""
    result = run_cli(*cli_args(out_dir, tiny_clip_dir, "--multi"))   # out_dir holds only the SFT weights
    assert result.returncode == 1
    assert result.stderr.strip().endswith("64_vlm_sft_multi.pth; train them with `2-sft_vlm.py --multi`, "
                                          "or ask the SFT model with --weight sft")
    shutil.copy(os.path.join(out_dir, "64_vlm_sft.pth"), tmp_path / "64_vlm_sft_multi.pth")
    for extra in ([], ["--weight", os.path.join(out_dir, "64_vlm_sft.pth")]):
        result = run_cli(*cli_args(str(tmp_path), tiny_clip_dir, "--multi", *extra))
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == 1
        assert [os.path.basename(p) for p in lines[0]["image"]] == ["0.jpg", "1.jpg"]
        assert lines[0]["prompt"] == "Name all the differences between these two birds."
    # Other pictures get the default question.
    own = run_cli(*cli_args(str(tmp_path), tiny_clip_dir, "--multi", "--image", *[os.path.join(EVAL, eval_picture(i))
                                                                                  for i in range(2)]))
    assert json.loads(own.stdout)["prompt"] == inf.DEFAULT_QUESTION


def test_cli_compile_answers_as_eager(out_dir, tiny_clip_dir, monkeypatch):
    """--compile sends the decoding step through torch.compile, dynamo turns it into a graph,
    and the greedy answer stays the same (compiling does not fall back). The graph runs as
    traced, without inductor: the C++ that inductor generates is checked by
    tests/test_reference.py's compiled test (the same tokens as eager, batched and not), and
    here it would cost half a minute for nothing new."""
    picture = os.path.join(EVAL, eval_picture())
    compiled_functions, graphs = [], []
    real_compile = torch.compile

    def record_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def compile_without_inductor(fn, **kwargs):
        kwargs.pop("options", None)   # inductor's
        compiled_functions.append(fn.__name__)
        return real_compile(fn, backend=record_graph, **kwargs)

    eager = run_cli(*cli_args(out_dir, tiny_clip_dir, "--image", picture))
    monkeypatch.setattr(torch, "compile", compile_without_inductor)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decoding step failed")
        compiled = run_cli(*cli_args(out_dir, tiny_clip_dir, "--image", picture, "--compile"))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled_functions == ["decode_step"] and graphs   # traced, not skipped by dynamo
    assert compiled.stdout == eager.stdout and json.loads(eager.stdout)["answer"]


def test_cli_interactive_reads_questions_until_an_empty_line(out_dir, tiny_clip_dir):
    result = run_cli(*cli_args(out_dir, tiny_clip_dir, "--interactive"),
                     stdin="第一个问题\n第二个问题\n\n第三个问题\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["第一个问题", "第二个问题"]
    assert os.path.basename(lines[0]["image"]) == eval_picture(0)


def test_cli_missing_files_give_one_line_errors(out_dir, tiny_clip_dir, tmp_path):
    result = run_cli("--out_dir", str(tmp_path), "--dim", "768", "--use_moe")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "768_moe_vlm_sft.pth" in result.stderr and "demo.py" in result.stderr

    result = run_cli(*cli_args(out_dir, str(tmp_path / "no-clip")))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "no-clip" in result.stderr
