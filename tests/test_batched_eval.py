"""Answering many questions at once: model.inference.answer_batch / iter_answers, the
3-eval_chat.py --batch_size and --questions flags, and bench/bench_eval.py's smoke run."""
import io
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import EVAL, ROOT, eval_picture, load_cli, save_tiny_checkpoint
from model import inference as inf
from model.vision import load_image

GREEDY = inf.Sampling(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("batched") / "64_vlm_sft.pth")


@pytest.fixture(scope="module")
def model(weights, tiny_clip_dir):
    return inf.load_model(weights, tiny_clip_dir)


@pytest.fixture(scope="module")
def chat():
    """3-eval_chat.py as a module: main(argv) in this process (a subprocess per run would spend
    most of its time importing torch)."""
    return load_cli()


def picture(i):
    return os.path.join(EVAL, eval_picture(i))


def one_by_one(model, tokenizer, requests, sampling=GREEDY):
    """The streaming path, which shares no batching code with answer_batch."""
    return ["".join(inf.stream_answer(model, tokenizer, [inf.open_picture(p) for p in r.images], r.question,
                                      r.history, sampling)) for r in requests]


def mixed_requests():
    """Seven requests: 0, 1 or 2 pictures (as paths, and one already opened), prompts of
    different lengths, one with history."""
    history = [{"role": "user", "content": "第一张图片里有什么动物？"}, {"role": "assistant", "content": "一只熊。"}]
    return [
        inf.Request("这是什么？", [picture(0)]),
        inf.Request("你好", []),
        inf.Request("比较这两张图片，哪一张更亮一些？请详细地说明理由。", [picture(1), picture(2)]),
        inf.Request("它在做什么？", [picture(3)], history),
        inf.Request("图中有几个人？", [load_image(picture(4))]),
        inf.Request("请用一句话描述这张图片的颜色和内容。", [picture(5), picture(6)]),
        inf.Request("写一首关于大海的短诗。", []),
    ]


# -- the library ----------------------------------------------------------------------------------
def test_greedy_batches_equal_one_by_one(model, tokenizer):
    requests = mixed_requests()
    lengths = {len(inf.build_prompt_ids(tokenizer, r.question, len(r.images), r.history)) for r in requests}
    assert len(lengths) == len(requests)                       # every batch needs left padding
    singles = one_by_one(model, tokenizer, requests)
    assert len(set(singles)) >= 5                              # the answers differ: pictures and words matter
    for batch_size in (3, 7):                                  # 3 does not divide 7: a short last batch
        results = inf.answer_batch(model, tokenizer, requests, GREEDY, batch_size)
        assert [r.error for r in results] == [None] * len(requests)
        assert [r.text for r in results] == singles
    assert inf.answer(model, tokenizer, [load_image(picture(0))], "这是什么？", sampling=GREEDY) == singles[0]


class EosIs:
    """The tokenizer, with another token playing end-of-sequence."""

    def __init__(self, tokenizer, eos):
        self.tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_rows_that_finish_early_are_cut_at_their_eos(model, tokenizer):
    requests = mixed_requests()[:4]
    long_run = inf.Sampling(temperature=0, max_new_tokens=12, stop_at_eos=False)
    ids = [inf.build_prompt_ids(tokenizer, r.question, len(r.images), r.history) for r in requests]
    tokens = [model.generate(torch.tensor([p]), max_new_tokens=12, eos_token_id=-1,
                             pixel_values=model.vision_encoder.preprocess([inf.open_picture(x) for x in r.images])
                             if r.images else None)[0].tolist() for p, r in zip(ids, requests)]
    eos = tokens[0][3]                      # request 0 "ends" after 3 tokens, the others later or never
    expected = [tokenizer.decode(t[:t.index(eos)] if eos in t else t, skip_special_tokens=True) for t in tokens]
    assert len(set(len(e) for e in expected)) > 1
    results = inf.answer_batch(model, EosIs(tokenizer, eos), requests, GREEDY, batch_size=4)
    assert [r.text for r in results] == expected
    # Without the stop, every row runs to max_new_tokens.
    full = inf.answer_batch(model, EosIs(tokenizer, eos), requests, long_run, batch_size=4)
    assert [r.text for r in full] == [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def test_a_bad_request_does_not_sink_its_batch(model, tokenizer, tmp_path):
    (tmp_path / "broken.png").write_text("not a picture")
    too_long = "长" * (model.config.max_seq_len + 10)              # "长" is one token
    history = [{"role": "user", "content": too_long}, {"role": "assistant", "content": "好"}]
    requests = [
        inf.Request("这是什么？", [picture(0)]),
        inf.Request("这是什么？", [str(tmp_path / "broken.png")]),           # unreadable picture
        inf.Request("这是什么？", [picture(1), str(tmp_path / "missing.png")]),  # missing picture
        inf.Request(too_long, [picture(2)], history),                      # too long, even without history
        inf.Request("你好".encode("gbk").decode("utf-8", "surrogateescape"), []),   # not UTF-8
        inf.Request("图里有什么？", [picture(3)]),
    ]
    results = inf.answer_batch(model, tokenizer, requests, GREEDY, batch_size=6)
    assert "broken.png is not a readable picture" in results[1].error
    assert "missing.png cannot be read" in results[2].error
    assert "too long" in results[3].error and "not UTF-8" in results[4].error
    assert all("\n" not in r.error for r in results[1:5])
    good = [requests[0], requests[5]]
    assert [results[0].text, results[5].text] == one_by_one(model, tokenizer, good)
    with pytest.raises(inf.UserError, match="not a readable picture"):
        inf.answer(model, tokenizer, [str(tmp_path / "broken.png")], "这是什么？", sampling=GREEDY)


def test_iter_answers_sorts_each_window_by_prompt_length(model, tokenizer):
    # Longest first, so that sorting shows; the indices say which request each answer is for.
    requests = [inf.Request("问" * n, []) for n in (9, 7, 5, 3, 1)]
    short = inf.Sampling(temperature=0, max_new_tokens=2)
    windowed = [i for i, _ in inf.iter_answers(model, tokenizer, requests, short, batch_size=2, window=1)]
    assert windowed == [1, 0, 3, 2, 4]                # two requests at a time, shortest first
    whole = [i for i, _ in inf.iter_answers(model, tokenizer, requests, short, batch_size=2, window=None)]
    assert whole == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="batch_size"):
        list(inf.iter_answers(model, tokenizer, requests, short, batch_size=0))
    assert inf.answer_batch(model, tokenizer, [], short) == []


def test_sampled_batches_are_reproducible_with_a_seed(model, tokenizer):
    hot = inf.Sampling(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=10)
    requests = mixed_requests()[:3]
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append([r.text for r in inf.answer_batch(model, tokenizer, requests, hot, batch_size=3)])
    assert runs[0] == runs[1] != runs[2]


# -- the command line: --batch_size -----------------------------------------------------------------
def chat_args(weights, clip, *extra):
    return ["--weight", weights, "--vision_model", clip, "--temperature", "0", "--max_new_tokens", "8", *extra]


def test_cli_batches_give_the_answers_of_one_by_one(chat, weights, tiny_clip_dir, model, tokenizer, tmp_path,
                                                      capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        shutil.copy(picture(i), folder)
    (folder / "broken.png").write_text("not a picture")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    outputs = {}
    for batch_size in ("1", "2"):
        assert chat.main(chat_args(weights, tiny_clip_dir, "--json", "--image", str(folder), str(empty),
                                   "--batch_size", batch_size)) == 0
        out, err = capsys.readouterr()
        assert err.splitlines() == [
            f"skipped: {folder / 'broken.png'} is not a readable picture (UnidentifiedImageError)",
            f"skipped: {empty} holds no pictures (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff)"]
        outputs[batch_size] = [json.loads(line) for line in out.splitlines()]
    assert outputs["2"] == outputs["1"] and len(outputs["1"]) == 3
    # Plain text: the header and the whole answer, once its batch is done.
    assert chat.main(chat_args(weights, tiny_clip_dir, "--image", picture(0), picture(1), "--batch_size", "2",
                               "--prompt", "图里有什么？")) == 0
    expected = one_by_one(model, tokenizer, [inf.Request("图里有什么？", [picture(i)]) for i in range(2)],
                          inf.Sampling(temperature=0, max_new_tokens=8))
    assert capsys.readouterr().out == "".join(f"[{eval_picture(i)}] 图里有什么？\n{expected[i]}\n\n" for i in range(2))


@pytest.mark.parametrize("extra,message", [
    (["--batch_size", "0"], "--batch_size: 0 is outside [1, inf]"),
    (["--batch_size", "two"], "--batch_size: 'two' is not a int"),
    (["--batch_size", "2", "--interactive"], "--interactive answers one question at a time"),
    (["--images_dir", "x"], "--images_dir and --output go with --questions"),
    (["--questions", "q.jsonl", "--multi"], "--questions brings its own pictures"),
    (["--prompt", " "], "--prompt is empty"),
])
def test_cli_rejects_bad_batch_and_question_flags(chat, extra, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        chat.parse_args(extra)
    assert excinfo.value.code == 2 and message in capsys.readouterr().err


# -- the command line: --questions ------------------------------------------------------------------
def write_questions(folder):
    """A JSONL question file (+ its pictures): four good records, three bad ones."""
    images = folder / "images"
    images.mkdir()
    for i in range(3):
        shutil.copy(picture(i), images / f"{i}.png")
    (images / "corrupt.png").write_text("not a picture")
    records = [
        {"id": "one", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "一个女子。"}]},
        {"id": "two", "image": "1.png, 2.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\n这两张图有什么不同？"}, {"from": "gpt", "value": "不同的动物。"},
            {"from": "human", "value": "哪一张更亮？"}, {"from": "gpt", "value": "第一张。"}]},
        {"id": "missing", "image": "nowhere.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "?"}]},
        {"id": "mismatch", "image": "0.png, 1.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "?"}]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "?"}]},
        {"image": "2.png", "conversations": [
            {"from": "human", "value": "图中是什么动物？<image>"}, {"from": "gpt", "value": "一头熊。"}]},
        {"id": 7, "image": "", "conversations": [
            {"from": "human", "value": "你好，请介绍一下你自己。"}, {"from": "gpt", "value": "我是 MiniMind。"}]},
    ]
    path = folder / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return str(path), str(images)


def test_cli_answers_a_question_file(chat, weights, tiny_clip_dir, model, tokenizer, tmp_path, capsys):
    questions, images = write_questions(tmp_path)
    output = tmp_path / "results" / "answers.jsonl"   # a folder not made yet: made
    code = chat.main(chat_args(weights, tiny_clip_dir, "--questions", questions, "--images_dir", images,
                               "--batch_size", "3", "--output", str(output)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "" and "Traceback" not in err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 3
    assert err.splitlines()[-1] == f"4 answer(s) to the 7 record(s) of {questions} written to {output}"
    assert any("'missing'" in s and "image file missing" in s for s in skipped)
    assert any("'mismatch'" in s and "image count mismatch" in s for s in skipped)
    assert any("'corrupt'" in s and "not a readable picture" in s for s in skipped)
    lines = {str(r["id"]): r for r in map(json.loads, output.read_text(encoding="utf-8").splitlines())}
    assert set(lines) == {"one", "two", f"{questions} line 6", "7"}
    assert lines["one"] == {"id": "one", "image": "0.png", "prompt": "这是什么？",
                            "answer": lines["one"]["answer"], "reference": "一个女子。"}
    assert lines["two"]["image"] == "1.png, 2.png" and lines["two"]["reference"] == "不同的动物。"
    assert lines["two"]["prompt"] == "这两张图有什么不同？"          # the first question only
    assert lines[f"{questions} line 6"]["prompt"] == "图中是什么动物？"   # the mark moves to the front
    assert lines["7"]["image"] == "" and lines["7"]["id"] == 7
    # The answers are the library's, asked one by one.
    asked = [inf.Request("这是什么？", [os.path.join(images, "0.png")]),
             inf.Request("这两张图有什么不同？", [os.path.join(images, "1.png"), os.path.join(images, "2.png")]),
             inf.Request("你好，请介绍一下你自己。", [])]
    expected = one_by_one(model, tokenizer, asked, inf.Sampling(temperature=0, max_new_tokens=8))
    assert [lines[k]["answer"] for k in ("one", "two", "7")] == expected


def test_cli_question_file_progress_and_ctrl_c(chat, weights, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """Answers going to --output show a progress bar on a terminal; Ctrl-C says how many
    answers the file holds, and they are whole lines."""
    questions, images = write_questions(tmp_path)
    output = tmp_path / "answers.jsonl"
    argv = chat_args(weights, tiny_clip_dir, "--questions", questions, "--images_dir", images, "--batch_size", "2",
                     "--output", str(output))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert chat.main(argv) == 0
    assert "answering: 100%" in terminal.getvalue() and "7/7" not in terminal.getvalue()   # 5 records to ask
    assert "5/5" in terminal.getvalue()
    monkeypatch.undo()

    answers = inf.iter_answers

    def interrupted_after_two(*args, **kwargs):
        for n, result in enumerate(answers(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(chat, "iter_answers", interrupted_after_two)
    assert chat.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"interrupted: {output} holds the 2 answer(s) written so far"
    assert len([json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]) == 2


def test_cli_question_file_keeps_only_unanswered_records(chat, weights, tiny_clip_dir, tmp_path, monkeypatch,
                                                         capsys):
    """A question file of millions of rows: what is kept per record lives only until it is answered."""
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": "", "conversations": [
        {"from": "human", "value": f"第{i}个问题？"}]}, ensure_ascii=False) + "\n" for i in range(40)), encoding="utf-8")
    requests, held = chat.question_requests, []

    def watched(source, images_dir, records, progress):
        for request in requests(source, images_dir, records, progress):
            held.append(len(records))
            yield request

    monkeypatch.setattr(chat, "question_requests", watched)
    assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", str(path), "--images_dir", str(tmp_path),
                               "--batch_size", "2")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 40
    assert len(held) == 40 and max(held) <= 8 * 2   # iter_answers reads 8 batches ahead


def test_cli_question_file_of_v1_sft_data(chat, weights, tiny_clip_dir, tmp_path, capsys):
    """v1's SFT data as downloaded (records name "0.png", the folder holds "COCO_train2014_0.png"):
    --questions has no --image_prefix, and needs none."""
    questions, images = write_questions(tmp_path)
    for name in os.listdir(images):
        os.rename(os.path.join(images, name), os.path.join(images, "COCO_train2014_" + name))
    assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", questions, "--images_dir", images)) == 0
    out, err = capsys.readouterr()
    assert "its pictures are COCO_train2014_<name>" in err
    assert {json.loads(line)["image"] for line in out.splitlines()} == {"COCO_train2014_0.png",
                                                                       "COCO_train2014_1.png, COCO_train2014_2.png",
                                                                       "COCO_train2014_2.png", ""}


def test_cli_samples_as_v1_did(chat, weights, tiny_clip_dir, capsys):
    """v1's 3-eval_chat.py sampled at temperature 0.5 from the 8 likeliest tokens, seeded with
    1337: the same answers from run to run. So do the defaults here; another seed, others."""
    argv = ["--weight", weights, "--vision_model", tiny_clip_dir, "--max_new_tokens", "12", "--json"]
    runs = []
    for extra in ([], [], ["--seed", "7"], ["--temperature", "0.5", "--top_k", "8", "--seed", "1337"]):
        assert chat.main(argv + extra) == 0
        runs.append([json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()])
    assert len(runs[0]) == len(os.listdir(EVAL)) and runs[0] == runs[1] == runs[3]
    assert runs[2] != runs[0]


def test_cli_answers_a_parquet_question_file(chat, weights, tiny_clip_dir, tmp_path, capsys):
    from scripts.convert_data import json_to_parquet

    questions, images = write_questions(tmp_path)
    parquet = str(tmp_path / "questions.parquet")
    json_to_parquet(questions, images, parquet, keep_order=True, progress=False)
    capsys.readouterr()
    answers = {}
    for source in ([questions, "--images_dir", images], [parquet]):
        assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", *source, "--batch_size", "4")) == 0
        answers[source[0]] = {r["prompt"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    from_json, from_parquet = answers[questions], answers[parquet]
    # corrupt.png is a file with bytes, so the converter stores it and answering rejects it, as from JSON.
    assert set(from_parquet) == set(from_json)
    for prompt, row in from_parquet.items():
        assert row["answer"] == from_json[prompt]["answer"] and row["reference"] == from_json[prompt]["reference"]
        # The pictures are inside the file: they have no names.
        assert row["image"] == (None if from_json[prompt]["image"] else "")


def test_cli_asks_question_only_rows_without_a_reference(chat, weights, tiny_clip_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    picture_bytes = open(picture(0), "rb").read()
    turns = [[{"from": "human", "value": "<image>\n这是什么？"}],
             [{"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "一个女子。"}]]
    parquet = str(tmp_path / "questions.parquet")
    pq.write_table(pa.table({"id": ["open", "answered"], "conversations": [json.dumps(t) for t in turns],
                             "image_bytes": [picture_bytes, picture_bytes]}), parquet)
    jsonl = tmp_path / "questions.jsonl"   # checked when the file is opened, where Parquet rows are checked when read
    shutil.copy(picture(0), tmp_path / "0.png")
    jsonl.write_text("".join(json.dumps({"id": i, "image": "0.png", "conversations": t}, ensure_ascii=False) + "\n"
                             for i, t in zip(["open", "answered"], turns)), encoding="utf-8")
    for source in ([parquet], [str(jsonl), "--images_dir", str(tmp_path)]):
        assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", *source, "--batch_size", "2")) == 0
        out, err = capsys.readouterr()
        assert "skipped" not in err, err
        lines = {r["id"]: r for r in map(json.loads, out.splitlines())}
        assert "reference" not in lines["open"] and lines["answered"]["reference"] == "一个女子。"
        assert lines["open"]["answer"] == lines["answered"]["answer"]   # the same question about the same picture


def test_cli_question_file_with_nothing_to_answer_fails(chat, weights, tiny_clip_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "x.png", "conversations": []}\nnot json\n', encoding="utf-8")
    code = chat.main(chat_args(weights, tiny_clip_dir, "--questions", str(path), "--images_dir", str(tmp_path)))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("skipped:") and lines[1].startswith("skipped:")
    assert lines[2].startswith("error: no question of") and "could be answered" in lines[2]
    assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", str(path))) == 1
    assert "--images_dir" in capsys.readouterr().err
    assert chat.main(chat_args(weights, tiny_clip_dir, "--questions", str(tmp_path / "none.jsonl"),
                               "--images_dir", str(tmp_path))) == 1
    assert "question file not found" in capsys.readouterr().err


# -- keeping freed memory for reuse --------------------------------------------------------------------
# Allocates blocks of 1 to 8 MiB (36 MiB, 9,216 pages), touches and frees them, then does that
# 10 times more and prints the page faults of those 10 rounds.
CHURN = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from model.inference import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[2] == "reuse" else False
def churn():
    blocks = [torch.ones(n << 18) for n in range(1, 9)]
    del blocks
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ROUND = 36 * 256


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_spares_the_page_faults_of_freed_blocks():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = {}
    for mode in ("default", "reuse"):
        proc = subprocess.run([sys.executable, "-c", CHURN, ROOT, mode], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        applied, faults = proc.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["reuse"][0] == "True"
    # With glibc's defaults the blocks are faulted in again (in some rounds or in all: its
    # thresholds move with use); kept for reuse, ten rounds fault in less than half a round.
    assert runs["reuse"][1] < PAGES_PER_ROUND / 2 < runs["default"][1]


def test_reuse_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert inf.reuse_freed_memory() is False


# -- the benchmark ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_eval_smoke_prints_its_json():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_eval.py"), "--smoke",
                           "--data_dir", "/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["questions"] == 4 and report["max_new_tokens"] == 8 and "disabled" in report["eos"]
    assert set(report["results"]) == {"1", "4"}
    for row in report["results"].values():
        assert row["answers_per_s"] > 0 and row["median_s"] > 0 and len(row["seconds"]) == report["repeats"]
    assert report["results"]["1"]["speedup_vs_batch1"] == 1.0 and report["results"]["4"]["speedup_vs_batch1"] > 0
    assert report["same_answers_at_every_batch_size"] is True
    assert len(report["load_average_1_5_15"]["before"]) == 3 and report["cpu"]
    assert report["malloc"] in ("reuse_freed_memory", "left as it was")
