"""The dataset layer: formats, loss masks, truncation, padding and every kind of bad record."""
import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dataset.vlm_dataset import IGNORE_INDEX, Skipped, VLMDataset, collate, make_collate
from model.config import IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_IDS
from model.prompt import count_placeholders, encode_conversation, load_tokenizer
from scripts.check_data import check_dataset, main as check_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = IMAGE_PLACEHOLDER_IDS
EOS = 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def images(tmp_path):
    """An images folder with a.jpg, b.png, c.jpg (small, distinct colours)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "a.jpg")
    Image.new("RGB", (5, 7), (0, 255, 0)).save(folder / "b.png")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(folder / "c.jpg")
    return folder


class Preprocess:
    """A stand-in image processor that remembers what it was given."""

    def __init__(self):
        self.seen = []

    def __call__(self, imgs):
        self.seen.append([(im.mode, im.size) for im in imgs])
        return torch.stack([torch.tensor(im.resize((4, 4)).getpixel((0, 0)), dtype=torch.float)
                            .view(3, 1, 1).expand(3, 4, 4) for im in imgs])


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def rec(id, image, *turns):
    """A record in the original from/value format; turns alternate human/gpt."""
    conv = [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]
    return {"id": id, "image": image, "conversations": conv}


def make(tok, path, images_dir, **kw):
    kw.setdefault("preprocess", Preprocess())
    return VLMDataset(path, images_dir, tok, IDS, **kw)


def answers(tok, item):
    """The text the loss is computed on, answer by answer."""
    labels = item["labels"].tolist()
    spans, cur = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


# ---- formats --------------------------------------------------------------------------------

def test_json_list_and_jsonl_give_the_same_samples(tok, tmp_path, images):
    records = [rec(1, "a.jpg", "<image>\n这是什么?", "一个红色方块。"),
               rec(2, "c.jpg", "描述<image>", "蓝色。")]
    ds_list = make(tok, write_json(tmp_path / "d.json", records), images)
    ds_lines = make(tok, write_jsonl(tmp_path / "d.jsonl", records), images)
    assert len(ds_list) == len(ds_lines) == 2 and not ds_list.problems
    for i in range(2):
        a, b = ds_list[i], ds_lines[i]
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert a["id"] == b["id"] == i + 1
        assert count_placeholders(a["input_ids"].tolist(), IDS) == 1
        assert a["pixel_values"].shape == (1, 3, 4, 4)


def test_role_content_turns_equal_from_value_turns(tok, tmp_path, images):
    old = rec(1, "a.jpg", "<image>问题", "回答")
    new = {"id": 1, "image": "a.jpg", "conversations": [
        {"role": "user", "content": "<image>问题"}, {"role": "assistant", "content": "回答"}]}
    a = make(tok, write_jsonl(tmp_path / "old.jsonl", [old]), images)[0]
    b = make(tok, write_jsonl(tmp_path / "new.jsonl", [new]), images)[0]
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert a["labels"].tolist() == b["labels"].tolist()


def test_multi_image_record_with_prefix(tok, tmp_path, images):
    for name in ("a.jpg", "b.png"):
        os.rename(images / name, images / f"COCO_{name}")
    data = write_jsonl(tmp_path / "d.jsonl", [rec("m", "a.jpg,  b.png", "<image>\n<image>\n区别?", "颜色")])
    pre = Preprocess()
    ds = make(tok, data, images, image_prefix="COCO_", preprocess=pre)
    item = ds[0]
    assert count_placeholders(item["input_ids"].tolist(), IDS) == 2
    assert pre.seen == [[("RGB", (8, 6)), ("RGB", (5, 7))]]  # in the order of the marks
    assert item["pixel_values"][0, :, 0, 0].tolist() == pytest.approx([254, 0, 0], abs=2)  # red first
    assert ds.source.read(0).pictures == [str(images / "COCO_a.jpg"), str(images / "COCO_b.png")]
    # Without the prefix the files do not exist.
    ds = make(tok, data, images)
    assert len(ds) == 0 and "image file missing" in ds.problems[0][1]


def test_cached_features_replace_pictures_which_are_then_never_read(tok, tmp_path, images):
    (images / "broken.jpg").write_bytes(b"not an image")
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "broken.jpg, a.jpg", "<image><image>?", "!"),
                                              rec(2, "", "你好", "好")])

    class Store:   # what the feature cache hands the dataset
        def problem(self, sample):
            return None

        def of(self, sample):
            return torch.full((2 if sample == 0 else 0, 50, 8), float(sample + 1))

    ds = make(tok, data, images)
    ds.use_features(Store())
    item = ds[0]
    assert not isinstance(item, Skipped) and "pixel_values" not in item
    assert item["image_features"].shape == (2, 50, 8)
    batch = collate([item, ds[1]])
    assert batch["pixel_values"] is None and batch["image_features"].shape == (2, 50, 8)
    assert batch["images_per_sample"].tolist() == [2, 0]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA", "1"])
def test_every_image_mode_reaches_preprocess_as_rgb(tok, tmp_path, images, mode):
    img = Image.new("RGB", (6, 6), (10, 200, 30)).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0
    name = "x.jpg" if mode == "CMYK" else "x.png"
    img.save(images / name)
    pre = Preprocess()
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, name, "<image>", "好")])
    item = make(tok, data, images, preprocess=pre)[0]
    assert not isinstance(item, Skipped), item
    assert pre.seen == [[("RGB", (6, 6))]]


def test_text_only_record(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "", "你好", "你好!")])
    item = make(tok, data, images)[0]
    assert item["pixel_values"] is None and item["n_images"] == 0
    assert collate([item])["pixel_values"] is None


# ---- loss mask and turns ----------------------------------------------------------------------

def test_loss_covers_every_answer_and_its_eos(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [
        rec(1, "a.jpg, c.jpg", "<image>\n这是什么?", "红色。", "那这个呢?<image>", "蓝色。", "好的", "再见")])
    ds = make(tok, data, images)
    item = ds[0]
    assert answers(tok, item) == ["红色。</s>", "蓝色。</s>", "再见</s>"]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert all(lab == t for lab, t in zip(labels, ids) if lab != IGNORE_INDEX)  # aligned, unshifted
    assert item["pixel_values"].shape[0] == 2

    # max_turns=1: the original single-turn behaviour; the second image goes with its turn.
    one = make(tok, data, images, max_turns=1)
    first = one[0]
    assert answers(tok, first) == ["红色。</s>"]
    assert first["pixel_values"].shape[0] == 1 and first["n_images"] == 1
    assert count_placeholders(first["input_ids"].tolist(), IDS) == 1


def test_approx_lengths_order_records_by_length(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "", "短", "短"), rec(2, "a.jpg", "<image>" + "长" * 30, "长" * 40)])
    ds = make(tok, data, images)
    assert len(ds.approx_lengths) == len(ds) == 2
    true = [len(ds[i]["input_ids"]) for i in range(2)]
    assert ds.approx_lengths[0] < ds.approx_lengths[1] and true[0] < true[1]
    assert ds.approx_lengths[1] >= 50  # the image placeholder is counted


# ---- truncation -------------------------------------------------------------------------------

def _pair_lengths(tok, turns):
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    return [len(encode_conversation(tok, msgs[:2 * p], IDS)[0]) for p in range(1, len(msgs) // 2 + 1)]


def test_truncation_keeps_whole_turn_pairs(tok, tmp_path, images):
    turns = ["<image>\n问题一", "回答一很长很长", "问题二", "回答二", "问题三", "回答三"]
    one, two, three = _pair_lengths(tok, turns)
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "a.jpg", *turns)])
    for max_len, n_answers, length in [(three, 3, three), (three - 1, 2, two), (two, 2, two),
                                       (two - 1, 1, one), (one, 1, one)]:
        item = make(tok, data, images, max_seq_len=max_len)[0]
        assert not isinstance(item, Skipped), (max_len, item)
        assert len(item["input_ids"]) == length <= max_len
        assert len(answers(tok, item)) == n_answers
        assert [t for t in item["labels"].tolist() if t != IGNORE_INDEX][-1] == EOS


def test_sample_skipped_when_first_turn_does_not_fit(tok, tmp_path, images):
    turns = ["<image>\n问题一", "回答一", "问题二", "回答二"]
    one = _pair_lengths(tok, turns)[0]
    data = write_jsonl(tmp_path / "d.jsonl", [rec("long", "a.jpg", *turns)])
    item = make(tok, data, images, max_seq_len=one - 1)[0]
    assert isinstance(item, Skipped) and item.index == 0
    assert "id='long'" in item.record_ref and "line 1" in item.record_ref
    assert f"longer than max_seq_len={one - 1}" in item.reason and f"{one} tokens" in item.reason
    strict = make(tok, data, images, max_seq_len=one - 1, strict=True)
    item = strict[0]      # items never raise (a DataLoader worker could not stop a run in one line)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        strict.report(item.record_ref, item.reason)   # the main process does, under strict


def test_sample_skipped_rather_than_cutting_an_image(tok, tmp_path, images):
    # The limit falls inside the second image span of the first turn: no valid cut exists.
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "a.jpg, c.jpg", "<image>\n<image>\n比较", "不同")])
    item = make(tok, data, images, max_seq_len=80)[0]
    assert isinstance(item, Skipped) and "max_seq_len=80" in item.reason
    assert not isinstance(make(tok, data, images, max_seq_len=200)[0], Skipped)


# ---- collate ----------------------------------------------------------------------------------

def test_dynamic_padding_and_labels(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "a.jpg", "<image>短", "短"),
                                              rec(2, "", "长问题" * 10, "长回答" * 10),
                                              rec(3, "b.png, c.jpg", "<image><image>", "两张")])
    ds = make(tok, data, images)
    items = [ds[i] for i in range(3)]
    lengths = [len(x["input_ids"]) for x in items]
    batch = make_collate(pad_id=0)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert (batch["input_ids"][b, n:] == 0).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()  # padding never counts
        assert batch["labels"][b, :n].tolist() == items[b]["labels"].tolist()
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["images_per_sample"].tolist() == [1, 0, 2]
    assert batch["indices"] == [0, 1, 2] and batch["ids"] == [1, 2, 3] and batch["skipped"] == []
    # Batch length follows the batch, not max_seq_len.
    assert collate(items[:1])["input_ids"].shape == (1, lengths[0])


def test_collate_drops_skipped_and_handles_an_all_skipped_batch(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [rec(1, "a.jpg", "<image>问", "答")])
    item = make(tok, data, images)[0]
    skip = Skipped(5, "f line 9", "image cannot be decoded: x")
    batch = collate([skip, item])
    assert batch["input_ids"].shape[0] == 1 and batch["indices"] == [0]
    assert batch["skipped"] == [("f line 9", "image cannot be decoded: x")]
    empty = collate([skip])
    assert empty["input_ids"].shape == empty["labels"].shape == empty["attention_mask"].shape == (0, 0)
    assert empty["pixel_values"] is None and empty["images_per_sample"].shape == (0,)


def test_works_with_a_dataloader_and_pickles(tok, tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [rec(i, "a.jpg", "<image>" + "问" * (i + 1), "答") for i in range(4)])
    ds = make(tok, data, images, preprocess=Preprocess())
    clone = pickle.loads(pickle.dumps(ds))  # what spawned DataLoader workers do
    assert clone[3]["input_ids"].tolist() == ds[3]["input_ids"].tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=make_collate(0))
    assert [b["input_ids"].shape[0] for b in loader] == [3, 1]


# ---- bad records ------------------------------------------------------------------------------

GOOD = rec("good", "a.jpg", "<image>问", "答")


def bad_dataset(tmp_path, images):
    """A JSONL file with one good record and one record of every load-time problem.

    Returns (path, {line number: expected reason fragment}, {line: expected reason} for the
    problems found only when the item is fetched).
    """
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_bytes(b"this is not an image")
    # Truncated after a valid header: opening works, only a full decode notices.
    Image.effect_noise((64, 64), 50).convert("RGB").save(images / "full.jpg", quality=95)
    data = (images / "full.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    lines = [
        (GOOD, None),
        ('{"id": "broken", "image": "a.jpg", ', "malformed JSON"),
        (b'{"id": "bytes", "image": "a.jpg", "conversations": [{"from": "human", "value": "\xff\xfe<image>"}, '
         b'{"from": "gpt", "value": "x"}]}', "text is not valid UTF-8"),
        ({"id": "noconv", "image": "a.jpg"}, "missing field: 'conversations'"),
        ({"id": "noimg", "conversations": GOOD["conversations"]}, "missing field: 'image'"),
        ({"id": "type", "image": ["a.jpg"], "conversations": GOOD["conversations"]}, "wrong field type"),
        ({"id": "turn", "image": "a.jpg", "conversations": [{"from": "human", "value": 3}]}, "bad turn"),
        (rec("empty", "", ), "empty conversation"),
        (rec("noanswer", "a.jpg", "<image>问"), "no assistant turn"),
        (rec("blank", "a.jpg", "<image>问", "  "), "empty answer"),
        (rec("dangling", "a.jpg", "<image>问", "答", "还有吗?"), "unanswered user turn"),
        ({"id": "order", "image": "", "conversations": [{"role": "assistant", "content": "答"}]},
         "turns do not alternate"),
        (rec("echo", "a.jpg", "<image>问", "答<image>"), "<image> mark in an answer"),
        (rec("marks", "a.jpg, c.jpg", "<image>问", "答"), "image count mismatch"),
        (rec("many", "a.jpg, b.png, c.jpg", "<image><image><image>", "答"), "too many images"),
        (rec("missing", "nothere.jpg", "<image>问", "答"), "image file missing"),
        (rec("zero", "empty.jpg", "<image>问", "答"), "image file is empty"),
        ('[1, 2]', "record is not a JSON object"),
    ]
    lazy = [(rec("notimage", "text.jpg", "<image>问", "答"), "image cannot be decoded"),
            (rec("truncated", "cut.jpg", "<image>问", "答"), "image cannot be decoded"),
            # Text that spells the placeholder would smuggle in an extra image span.
            (rec("spoof", "", IMAGE_PLACEHOLDER, "答"), "placeholder count mismatch")]
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for r, _ in lines + lazy:
            raw = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(raw + b"\n")
    load = {n: why for n, (_, why) in enumerate(lines, 1) if why}
    late = {n: why for n, (_, why) in enumerate(lazy, len(lines) + 1)}
    return str(path), load, late


def test_every_bad_record_is_skipped_with_a_named_reason(tok, tmp_path, images, caplog):
    path, load, late = bad_dataset(tmp_path, images)
    with caplog.at_level(logging.WARNING, logger="dataset.vlm_dataset"):
        ds = make(tok, path, images, max_images=2)
    assert len(ds) == 1 + len(late)  # the good record and the ones only fetching can judge
    assert len(ds.problems) == len(load) == len(caplog.records)  # one warning line each
    for (ref, reason), (line, why), log in zip(ds.problems, load.items(), caplog.records):
        assert ref.startswith(f"{path} line {line}") and why in reason, (ref, reason)
        assert log.getMessage() == f"{ref}: {reason}" and "\n" not in log.getMessage()
    assert "id='noconv'" in ds.problems[2][0]
    assert not isinstance(ds[0], Skipped)
    for i, (line, why) in enumerate(late.items(), 1):
        item = ds[i]
        assert isinstance(item, Skipped) and f"line {line}" in item.record_ref and why in item.reason
        ds.report(item.record_ref, item.reason)
        ds.report(item.record_ref, item.reason)  # reported again next epoch: counted once
    assert len(ds.problems) == len(load) + len(late)
    summary = ds.summary()
    assert f"{len(load) + 1 + len(late)} record(s), {1 + len(late)} in use" in summary
    assert "2  image cannot be decoded" in summary and "1  placeholder count mismatch" in summary and "1  malformed JSON" in summary


def test_bad_records_in_a_json_list(tok, tmp_path, images):
    good = dict(GOOD)
    path = tmp_path / "d.json"
    path.write_bytes(b'[' + json.dumps(good).encode() + b', {"id": 9, "image": "a.jpg", "conversations": '
                     b'[{"from": "human", "value": "<image>\xff"}, {"from": "gpt", "value": "x"}]}, '
                     + json.dumps(rec(10, "a.jpg", "问", "答")).encode() + b']')
    ds = make(tok, str(path), images)
    assert len(ds) == 1
    assert ds.problems[0][0] == f"{path} record [1] (id=9)" and "not valid UTF-8" in ds.problems[0][1]
    assert ds.problems[1][0].endswith("record [2] (id=10)") and "image count mismatch" in ds.problems[1][1]


def test_strict_raises_at_the_first_problem(tok, tmp_path, images):
    path, load, late = bad_dataset(tmp_path, images)
    with pytest.raises(ValueError, match=r"line 2: malformed JSON"):
        make(tok, path, images, strict=True)
    data = write_jsonl(tmp_path / "lazy.jsonl", [rec("t", "text.jpg", "<image>问", "答")])
    ds = make(tok, data, images, strict=True)
    item = ds[0]
    assert isinstance(item, Skipped)
    with pytest.raises(ValueError, match="image cannot be decoded"):
        ds.report(item.record_ref, item.reason)


def test_check_data_reports_everything(tok, tmp_path, images, capsys):
    path, load, late = bad_dataset(tmp_path, images)
    problems = check_dataset(path, str(images), max_images=2, tokenizer=tok, progress=False)
    lines = sorted(int(ref.split(" line ")[1].split()[0]) for ref, _ in problems)
    assert lines == sorted(list(load) + list(late))
    assert check_main(["--data_path", path, "--images_dir", str(images), "--max_images", "2"]) == 1
    assert f"{len(load) + len(late)} problem(s)" in capsys.readouterr().out
    clean = write_jsonl(tmp_path / "clean.jsonl", [GOOD])
    assert check_dataset(clean, str(images), tokenizer=tok, progress=False) == []
    assert check_main(["--data_path", clean, "--images_dir", str(images)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": 1 record(s), 1 in use, no problems")


def test_check_data_script_runs_from_the_repo_root(tmp_path, images):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, rec("gone", "gone.jpg", "<image>", "x")])
    cmd = [sys.executable, "scripts/check_data.py", "--images_dir", str(images), "--data_path", bad]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "line 2 (id='gone'): image file missing" in run.stdout
    assert "1 problem(s)" in run.stdout


def test_samples_whose_cached_pictures_failed_are_reported_and_left_out(tmp_path, tok):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [{"id": i, "image": n, "conversations": [{"from": "human", "value": "<image>\n?"},
                                                    {"from": "gpt", "value": "ok"}]}
            for i, n in enumerate(["a.png", "b.png", "a.png"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = VLMDataset(str(tmp_path / "d.jsonl"), str(tmp_path), tok, IMAGE_PLACEHOLDER_IDS)

    class Store:
        def problem(self, sample):
            return "image cannot be decoded: a.png" if sample in (0, 2) else None

        def of(self, sample):
            return torch.zeros(1, 50, 8)

    ds.use_features(Store())
    assert len(ds) == 1 and ds[0]["id"] == 1 and len(ds.approx_lengths) == 1
    assert len(ds.problems) == 2 and all("a.png" in reason for _, reason in ds.problems)


def test_a_json_list_is_streamed_record_by_record(tmp_path):
    """v1's data came as JSON lists: parsed whole, 200K records took 330 MB in every process."""
    from dataset.records import read_json_lines

    records = [{"id": 1, "text": 'brackets and commas as text: [ ] { } , \\" \\\\ ,]'},
               {"id": "二", "nested": [1, [2, {"x": "]"}]], "text": "中文，逗号"}, 3, "a string, with ]", None]
    raw = json.dumps(records, ensure_ascii=False, indent=2).encode()
    path = tmp_path / "list.json"
    for text in (raw, b"\xef\xbb\xbf \n" + raw, raw.replace(b"\n", b"")):   # with a BOM, one line
        path.write_bytes(text)
        lines = list(read_json_lines(str(path)))
        assert [line.record for line in lines] == records and [line.number for line in lines] == [0, 1, 2, 3, 4]
        assert [json.loads(text[line.offset:line.offset + line.size]) for line in lines] == records

    def read(text):
        path.write_bytes(text)
        return [(line.record, line.error) for line in read_json_lines(str(path))]

    assert read(b"[]") == read(b" [ \n ] \n") == []
    assert read(b'[{"a": 1},]') == [({"a": 1}, None), (None, "malformed JSON: an empty record")]
    assert read(b'[{"a": 1} {"b": 2}, 5]')[1:] == [(5, None)]   # the broken one is one bad record
    with pytest.raises(ValueError, match=r"not a valid JSON list \(the file ends inside record \[1\]: cut off\?\)"):
        read(b'[{"a": 1}, {"b": [2')
    with pytest.raises(ValueError, match=r"not a valid JSON list \(text after its closing bracket\)"):
        read(b'[{"a": 1}] {"b": 2}')


def test_json_list_records_are_read_again_from_the_file(tok, tmp_path, images):
    """What a data-loading worker is handed is where the records lie, not the records."""
    import pickle

    path = tmp_path / "d.json"
    long_answer = rec("x", "a.jpg", "<image>问", "答" * 300)["conversations"]
    path.write_text(json.dumps([dict(GOOD, id=i, conversations=long_answer) for i in range(500)]))
    ds = make(tok, str(path), images)
    assert len(ds) == 500 and [ds.source.read(i).record_id for i in (0, 123, 499)] == [0, 123, 499]
    assert len(pickle.dumps(ds.source)) < path.stat().st_size / 20
