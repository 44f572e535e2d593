"""The Parquet record source (dataset/parquet.py) and the converter (scripts/convert_data.py).

Every file here is made by the tests: a few hundred rows in several row groups, real JPEG
bytes, both layouts, and bad rows of every kind the source reports.
"""
import hashlib
import io
import json
import logging
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import damaged_copy
from dataset.parquet import ParquetRecords, is_parquet, layout_of, parquet_files
from dataset.records import BadRecord, RawRecord
from dataset.records import read_records
from scripts import convert_data
from scripts.convert_data import json_to_parquet, parquet_to_json, rewrite_parquet


# ---- helpers: pictures and files ----------------------------------------------------------

def jpeg(seed: int, size: int = 16) -> bytes:
    """Real JPEG bytes of a noise picture (noise keeps every seed's bytes distinct)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


PICTURES = [jpeg(k) for k in range(12)]
STANDIN = convert_data.standin_picture()


def raw_strings(values) -> pa.Array:
    """A string array of str / bytes / None; bytes are stored as they are, valid UTF-8 or not
    (pa.array would refuse invalid bytes, a file written by another tool may hold them)."""
    data = [v.encode() if isinstance(v, str) else (v or b"") for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).astype(np.int32)
    valid = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [valid, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


BAD_OFFICIAL = [  # (stored conversations, stored picture, the reason's kind)
    ('[{"role": "user", "content": "<image> hi"', PICTURES[0], "malformed JSON"),
    ('{"role": "user", "content": "<image>"}', PICTURES[0], "wrong field type"),
    ('[{"role": "user"}, {"role": "assistant", "content": "a"}]', None, "bad turn"),
    ('["<image> what?", "an answer"]', PICTURES[0], "bad turn"),
    ('[{"role": "user", "content": "\\udc80 <image>"}, {"role": "assistant", "content": "a"}]',
     PICTURES[0], "text is not valid UTF-8"),
    (b'[{"role": "user", "content": "\xff\xfe <image>"}, {"role": "assistant", "content": "a"}]',
     PICTURES[0], "text is not valid UTF-8"),
    (None, PICTURES[0], "missing field"),
    (json.dumps([user("<image> where?"), assistant("here")]), None, "missing picture"),
    (json.dumps([user("<image> where?"), assistant("here")]), b"", "missing picture"),
    (json.dumps([user("<image><image> two?"), assistant("one")]), PICTURES[1],
     "image count mismatch"),
]


def official_rows(n=240):
    """Rows of the single-picture official file: (id, conversations, picture, expected), the
    expectation a RawRecord or the reason's kind."""
    rows = []
    for i in range(n):
        kind = i % 10
        if kind <= 5:  # a picture row; the mark at the start, the end or in the middle
            question = ["<image>\nWhat is this?", "Describe it: <image>",
                        "Look <image> here"][i % 3]
            if i % 4 == 0:
                question += " 这是什么？"
            turns = [user(question), assistant("It is a picture. " * (1 + i % 13))]
            if i % 7 == 0:
                turns += [user("And the colour?"), assistant("Noisy.")]
            text = json.dumps(turns, ensure_ascii=i % 8 == 0)  # some rows \u-escape Chinese
            picture = PICTURES[i % len(PICTURES)]  # several rows share every picture
            rows.append((i, text, picture, RawRecord(i, turns, [picture])))
        elif kind <= 7:  # text-only: the 8x8 stand-in, a null or empty bytes
            turns = [user(f"Count to {i}."), assistant("1 2 3 " * (1 + i % 5))]
            picture = [STANDIN, None, b""][i % 3]
            text = json.dumps(turns, ensure_ascii=False)
            rows.append((i, text, picture, RawRecord(i, turns, [])))
        else:
            text, picture, reason = BAD_OFFICIAL[(i // 10 * 2 + kind - 8) % len(BAD_OFFICIAL)]
            rows.append((i, text, picture, reason))
    return rows


def write_official(path, rows, row_group_size=50, **options):
    table = pa.table({"id": pa.array([r[0] for r in rows], pa.int64()),
                      "conversations": raw_strings([r[1] for r in rows]),
                      "image_bytes": pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_size, **options)
    return str(path)


def multi_rows():
    """Rows of an official file with a list-of-binary picture column and no id column."""
    rows = []
    for i in range(60):
        kind = i % 6
        if kind in (0, 1):
            turns = [user("<image>\n<image>\nWhat differs?"), assistant(f"Picture {i} is darker.")]
            pictures = [PICTURES[i % 12], PICTURES[(i + 5) % 12]]
            rows.append((turns, pictures, RawRecord(None, turns, pictures)))
        elif kind == 2:
            turns = [user("One: <image>"), assistant("ok")]
            rows.append((turns, [PICTURES[i % 12]], RawRecord(None, turns, [PICTURES[i % 12]])))
        elif kind == 3:
            turns = [user("No picture here."), assistant("fine")]
            rows.append((turns, [STANDIN], RawRecord(None, turns, [])))
        else:
            turns = [user("<image><image> two?"), assistant("yes")]
            pictures, reason = [([PICTURES[0]] * 3, "image count mismatch"),
                                ([PICTURES[0], None], "missing picture"),
                                ([], "missing picture")][i // 6 % 3]
            rows.append((turns, pictures, reason))
    return rows


def write_multi(path, rows, row_group_size=16):
    table = pa.table({"conversations": pa.array([json.dumps(r[0]) for r in rows]),
                      "image_bytes": pa.array([r[1] for r in rows], pa.list_(pa.binary()))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


HUB_TURN = pa.struct([("from", pa.string()), ("value", pa.string())])
HUB_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hub_rows():
    """Rows of a Hub-style LLaVA file: (id, turns as (from, value bytes|str|None), image)."""
    rows = []
    for i in range(90):
        kind = i % 9
        if kind <= 4:
            turns = [("human", "<image>\nWhat is shown?"), ("gpt", "A pattern. " * (1 + i % 7))]
            image = {"bytes": PICTURES[i % 12], "path": f"{i}.jpg"}
            expected = RawRecord(f"hub-{i}", [{"from": f, "value": v} for f, v in turns],
                                 [PICTURES[i % 12]])
        elif kind <= 6:  # text-only: no image at all, or a struct without bytes
            turns = [("human", "Say hi."), ("gpt", "hi")]
            image = [None, {"bytes": None, "path": None}][kind - 5]
            expected = RawRecord(f"hub-{i}", [{"from": f, "value": v} for f, v in turns], [])
        else:
            turns, image, expected = [
                ([("human", "<image> ?"), ("gpt", "a")], {"bytes": None, "path": "lost.jpg"},
                 "missing picture"),
                ([("human", "<image> ?"), ("gpt", None)], {"bytes": PICTURES[0], "path": ""},
                 "bad turn"),
                ([("human", b"<image> \xc3\x28"), ("gpt", "a")],
                 {"bytes": PICTURES[0], "path": ""}, "text is not valid UTF-8"),
                ([("human", "<image><image> ?"), ("gpt", "a")],
                 {"bytes": PICTURES[0], "path": ""}, "image count mismatch"),
            ][(i // 9 + kind) % 4]
        rows.append((f"hub-{i}", turns, image, expected))
    return rows


def write_hub(path, rows, row_group_size=20):
    flat = [t for r in rows for t in r[1]]
    turns = pa.StructArray.from_arrays([pa.array([t[0] for t in flat]),
                                        raw_strings([t[1] for t in flat])], fields=list(HUB_TURN))
    offsets = pa.array(np.cumsum([0] + [len(r[1]) for r in rows]).astype(np.int32))
    table = pa.table({"id": pa.array([r[0] for r in rows]),
                      "image": pa.array([r[2] for r in rows], HUB_IMAGE),
                      "conversations": pa.ListArray.from_arrays(offsets, turns)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def check_read(records, expected, start=0):
    """read() of every row equals the expectation (a RawRecord, or a BadRecord kind)."""
    for i, want in enumerate(expected, start):
        if isinstance(want, RawRecord):
            assert records.read(i) == want, records.ref(i)
        else:
            with pytest.raises(BadRecord) as bad:
                records.read(i)
            assert str(bad.value).startswith(want), (records.ref(i), str(bad.value))


def exact_length(turns) -> int:
    """The dataset's length estimate, computed from parsed turns."""
    texts = [t.get("content", t.get("value")) for t in turns]
    marks = sum(t.count("<image>") for t in texts)
    return sum(len(t) for t in texts) - 7 * marks + 50 * marks + 8 * len(texts)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parquet")
    official = official_rows()
    multi = multi_rows()
    hub = hub_rows()
    return {
        "official": write_official(folder / "a_official.parquet", official),
        "official_rows": official,
        "multi": write_multi(folder / "b_multi.parquet", multi),
        "multi_rows": multi,
        "hub": write_hub(folder / "c_hub.parquet", hub),
        "hub_rows": hub,
        "folder": str(folder),
    }


def expected_of(files, name):
    return [r[-1] for r in files[name + "_rows"]]


# ---- specs and layouts --------------------------------------------------------------------

def test_file_folder_and_glob_specs(files, tmp_path):
    folder = files["folder"]
    (tmp_path / "notes.txt").write_text("not data")
    assert parquet_files(files["hub"]) == [files["hub"]]
    assert parquet_files(folder) == [files["official"], files["multi"], files["hub"]]
    assert parquet_files(os.path.join(folder, "*_m*.parquet")) == [files["multi"]]
    assert is_parquet(files["hub"]) and is_parquet(folder)
    assert is_parquet(os.path.join(folder, "*.parquet"))
    assert not is_parquet(str(tmp_path)) and not is_parquet("data.jsonl")
    for spec in (str(tmp_path / "none.parquet"), str(tmp_path), str(tmp_path / "*.parquet")):
        with pytest.raises(FileNotFoundError) as err:
            parquet_files(spec)
        assert spec in str(err.value) and "\n" not in str(err.value)

    records = ParquetRecords(folder)
    sizes = [len(files[k + "_rows"]) for k in ("official", "multi", "hub")]
    assert len(records) == sum(sizes) == len(records.approx_lengths)
    check_read(records, expected_of(files, "official") + expected_of(files, "multi")
               + expected_of(files, "hub"))
    first_hub = sizes[0] + sizes[1]
    assert records.ref(first_hub + 3) == f"{files['hub']} row 3 (id='hub-3')"
    assert records.ref(sizes[0] + 1) == f"{files['multi']} row 1"  # no id column


def test_layouts_are_detected(files):
    assert layout_of(files["official"]) == layout_of(files["multi"]) == "official"
    assert layout_of(files["hub"]) == "hub"


def test_an_unknown_schema_is_one_line_naming_the_file_and_its_columns(tmp_path):
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), path)
    with pytest.raises(ValueError) as err:
        ParquetRecords(path)
    message = str(err.value)
    assert message.startswith(path + ": not a MiniMind-V or LLaVA Parquet file")
    assert "found columns [a, b]" in message and "\n" not in message

    pq.write_table(pa.table({"conversations": [1], "image_bytes": [b"x"]}), path)
    with pytest.raises(ValueError, match="'conversations' is int64"):
        ParquetRecords(path)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        ParquetRecords(str(tmp_path / "fake.parquet"))


# ---- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["official", "multi", "hub"])
def test_read_gives_every_row_as_written(files, name):
    records = ParquetRecords(files[name])
    expected = expected_of(files, name)
    assert len(records) == len(expected)
    kinds = {w if isinstance(w, str) else ("pictures" if w.pictures else "text") for w in expected}
    assert {"pictures", "text", "missing picture", "image count mismatch"} <= kinds
    check_read(records, expected)
    # Random order gives the same rows (the LRU must not mix row groups up).
    order = np.random.default_rng(0).permutation(len(expected))
    for i in order[:60]:
        if isinstance(expected[i], RawRecord):
            assert records.read(int(i)) == expected[i]


def test_escapes_are_read_and_rows_are_found_across_files(tmp_path):
    """JSON escapes of valid characters read as those characters (only a lone surrogate is
    bad), and rows are located right across files and row groups, never past the end."""
    escaped = '[{"role": "user", "content": "<image>\\n\\u4e2d\\u6587\\ud83d\\ude00"}, ' \
              '{"role": "assistant", "content": "\\"ok\\""}]'
    plain = json.dumps([user("<image> hi"), assistant("a")])
    write_official(tmp_path / "a.parquet", [(0, escaped, PICTURES[0]), (1, plain, PICTURES[1])],
                   row_group_size=1)
    write_official(tmp_path / "b.parquet", [(k, plain, PICTURES[k % 12]) for k in range(2, 7)],
                   row_group_size=2)
    records = ParquetRecords(str(tmp_path))
    assert records.read(0).turns == [user("<image>\n中文\U0001F600"), assistant('"ok"')]
    assert [records.read(i).record_id for i in range(len(records))] == list(range(7))
    assert [records.read(i).pictures for i in range(len(records))] == [[PICTURES[0]], [PICTURES[1]]] + [
        [PICTURES[k % 12]] for k in range(2, 7)]
    assert records.ref(3) == f"{tmp_path / 'b.parquet'} row 1 (id=3)"
    for outside in (-1, 7):
        with pytest.raises(IndexError):
            records.read(outside)


def test_every_bad_kind_is_reported(files):
    kinds = {r[-1] for r in files["official_rows"] if isinstance(r[-1], str)}
    assert kinds == {reason for _, _, reason in BAD_OFFICIAL}
    assert {"bad turn", "text is not valid UTF-8"} <= {
        r[-1] for r in files["hub_rows"] if isinstance(r[-1], str)}


def test_the_index_holds_no_per_row_python_objects(tmp_path):
    """Twice the rows in as many row groups: the pickled index grows by 4 bytes a row (the
    int32 approx_lengths) and nothing else."""
    sizes = []
    for rows in (2000, 4000):
        path = tmp_path / f"{rows}.parquet"
        table = pa.table({"conversations": [json.dumps([user("q"), assistant("a")])] * rows,
                          "image_bytes": pa.array([STANDIN] * rows, pa.binary())})
        pq.write_table(table, path, row_group_size=rows // 4)
        records = ParquetRecords(str(path))
        assert records.approx_lengths.dtype == np.int32 and len(records) == rows
        sizes.append(len(pickle.dumps(records)))
    assert abs((sizes[1] - sizes[0]) - 4 * 2000) < 100, sizes


def test_approx_lengths_follow_the_true_lengths(files):
    for name in ("official", "hub"):
        records = ParquetRecords(files[name])
        good = [(i, w) for i, w in enumerate(expected_of(files, name)) if isinstance(w, RawRecord)]
        estimate = np.array([records.approx_lengths[i] for i, _ in good])
        exact = np.array([exact_length(w.turns) for _, w in good])
        turns = np.array([len(w.turns) for _, w in good])
        assert len(set(exact)) >= 8  # the rows differ in length
        assert np.all(np.abs(estimate - exact) <= 2 * turns), (name, estimate - exact)
        assert all(records.approx_lengths[i] >= 50 for i, w in good if w.pictures)


def test_text_only_reads_never_touch_the_picture_column(files, tmp_path):
    """Garbage over every picture column chunk: text reads still work, picture reads fail."""
    rows = files["official_rows"]
    path = write_official(tmp_path / "broken.parquet", rows, compression="none")
    md = pq.ParquetFile(path).metadata
    picture = md.schema.names.index("image_bytes")
    with open(path, "r+b") as f:
        for r in range(md.num_row_groups):
            chunk = md.row_group(r).column(picture)
            start = min(x for x in (chunk.dictionary_page_offset, chunk.data_page_offset) if x)
            f.seek(start)
            f.write(b"\xff" * chunk.total_compressed_size)

    records = ParquetRecords(path)
    for i, (_, _, _, want) in enumerate(rows):
        if isinstance(want, RawRecord):
            assert records.read(i, with_pictures=False) == want._replace(pictures=[])
            if want.pictures:
                with pytest.raises(BadRecord, match="^unreadable row group"):
                    records.read(i)
            else:
                assert records.read(i) == want  # text-only rows never need the pictures
    # Streaming does not stop at an unreadable row group: its rows have no pictures.
    assert list(records.iter_pictures()) == [(i, []) for i in range(len(rows))]


def test_consecutive_rows_decode_their_row_group_once(files, monkeypatch):
    loads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        loads.append((i, tuple(columns)))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    records = ParquetRecords(files["official"])
    for with_pictures in (False, True):
        for i in range(100):  # two row groups of 50
            try:
                records.read(i, with_pictures=with_pictures)
            except BadRecord:
                pass
    assert loads[:2] == [(0, ("conversations", "id")), (1, ("conversations", "id"))]
    assert loads[2:] == [(0, ("image_bytes",)), (1, ("image_bytes",))]


def test_the_row_group_cache_stays_within_its_byte_bound(files):
    probe = ParquetRecords(files["multi"])
    probe.read(0)
    one_group = probe.cached_bytes  # the text and the pictures of one row group
    bound = int(2.5 * one_group)
    records = ParquetRecords(files["multi"], cache_bytes=bound)
    expected = expected_of(files, "multi")
    most = 0
    for i in list(range(len(records))) + list(range(len(records)))[::-1]:
        try:
            assert records.read(i) == expected[i]
        except BadRecord:
            assert isinstance(expected[i], str)
        assert records.cached_bytes <= bound
        most = max(most, len(records._cache))
    assert most >= 2 and records.cached_bytes > one_group  # it does cache, up to the bound


# ---- processes ----------------------------------------------------------------------------

class RowDigests(torch.utils.data.Dataset):
    """What a worker read: (row, id, sha1 of the pictures) or (row, the BadRecord reason)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            record = self.records.read(i)
        except BadRecord as bad:
            return i, str(bad)
        # A forked worker must not go on with its parent's handles and cache.
        assert self.records._pid == os.getpid()
        return i, record.record_id, [hashlib.sha1(p).hexdigest() for p in record.pictures]


def as_list(batch):
    return batch


def test_pickles_without_handles_and_reads_in_dataloader_workers(files):
    records = ParquetRecords(files["folder"])
    in_process = [RowDigests(records)[i] for i in range(len(records))]  # opens every file
    state = records.__getstate__()
    assert not {"_open", "_cache", "_pid"} & set(state)
    copy = pickle.loads(pickle.dumps(records))
    assert [copy.read(i, with_pictures=False).turns for i in (0, 5)] == [
        records.read(i, with_pictures=False).turns for i in (0, 5)]
    for context in ("fork", "spawn"):
        loader = torch.utils.data.DataLoader(RowDigests(records), batch_size=16, num_workers=2,
                                             collate_fn=as_list, multiprocessing_context=context)
        assert [item for batch in loader for item in batch] == in_process, context


# ---- streaming and warnings ---------------------------------------------------------------

@pytest.mark.parametrize("start, stop, step", [(0, None, 1), (7, 150, 3), (45, 55, 1),
                                               (0, None, 97), (235, None, 5), (250, 330, 7)])
def test_iter_pictures_streams_the_wanted_rows(files, start, stop, step, monkeypatch):
    streamed = []  # (row group, columns) of every row group read
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, columns=None, **kw):
        streamed.append((tuple(row_groups), tuple(columns)))
        return original(self, *args, row_groups=row_groups, columns=columns, **kw)

    records = ParquetRecords(files["folder"])
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    expected = expected_of(files, "official") + expected_of(files, "multi") + expected_of(
        files, "hub")
    stop_at = len(records) if stop is None else stop
    wanted = range(start, stop_at, step)
    want = [(i, expected[i].pictures if isinstance(expected[i], RawRecord) else [])
            for i in wanted]
    assert list(records.iter_pictures(start, stop, step)) == want
    # Only row groups holding a wanted row are read, one at a time, text and pictures only.
    assert 0 < len(streamed) <= len(wanted)
    assert {columns for _, columns in streamed} <= {("conversations", "image_bytes"),
                                                    ("conversations", "image")}


def test_large_row_groups_get_one_warning(tmp_path, caplog, files):
    rows = 10_001
    path = str(tmp_path / "huge.parquet")
    pq.write_table(pa.table({"conversations": [json.dumps([user("q"), assistant("a")])] * rows,
                             "image_bytes": pa.array([STANDIN] * rows, pa.binary())}),
                   path, row_group_size=rows)
    with caplog.at_level(logging.WARNING, logger="dataset.parquet"):
        ParquetRecords(files["official"])
        assert caplog.records == []
        ParquetRecords(path)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert path in message and "scripts/convert_data.py --input " + path in message

    small = str(tmp_path / "small.parquet")
    rewrite_parquet(path, small, row_group_size=4000, progress=False)
    assert [pq.ParquetFile(small).metadata.row_group(r).num_rows for r in range(3)] == [
        4000, 4000, 2001]
    assert pq.read_table(small).equals(pq.read_table(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dataset.parquet"):
        ParquetRecords(small)
    assert caplog.records == []


# ---- conversion ---------------------------------------------------------------------------

def write_source(folder, n=200, shared=10, several=True):
    """A JSONL file and its image folder: `shared` pictures in random order over n records,
    some text-only, some with two pictures (if `several`), two bad lines.
    Returns (path, image folder, records)."""
    images = folder / "images"
    images.mkdir()
    pictures = [jpeg(100 + k, size=48) for k in range(shared)]
    for k, data in enumerate(pictures):
        (images / f"COCO_{k}.jpg").write_bytes(data)
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        k, other = (int(x) for x in rng.integers(0, shared, 2))
        if i % 10 == 3:
            records.append({"id": i, "image": "", "conversations": [
                {"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": "1 2 3"}]})
        elif i % 10 == 6 and several:
            records.append({"id": i, "image": f"{k}.jpg, {other}.jpg", "conversations": [
                {"from": "human", "value": "<image>\n<image>\nSame?"},
                {"from": "gpt", "value": "No."}]})
        else:
            records.append({"id": i, "image": f"{k}.jpg", "conversations": [
                {"from": "human", "value": f"What is in picture {i}? <image>"},
                {"from": "gpt", "value": "Noise " * (1 + i % 4)}]})
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(5, '{"id": "broken", "image": ')  # malformed JSON
    lines.insert(9, json.dumps({"id": "lost", "image": "missing.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(images), records


def normalized(record, images_dir, prefix=""):
    """(id, [(role, text)], [picture bytes]) of a JSON record, whatever its turn style."""
    roles = {"human": "user", "gpt": "assistant"}
    turns = [(roles.get(t.get("from", t.get("role")), t.get("from", t.get("role"))),
              t.get("value", t.get("content"))) for t in record["conversations"]]
    names = [n.strip() for n in record["image"].split(",") if n.strip()]
    pictures = []
    for name in names:
        with open(os.path.join(images_dir, prefix + name), "rb") as f:
            pictures.append(f.read())
    return record.get("id"), turns, pictures


def test_convert_round_trip_keeps_records_and_picture_bytes(tmp_path, capsys):
    source, images, records = write_source(tmp_path)
    parquet = str(tmp_path / "data.parquet")
    result = json_to_parquet(source, images, parquet, image_prefix="COCO_", row_group_size=50,
                             progress=False)
    assert result["rows"] == len(records) and result["bad"] == 2
    err = capsys.readouterr().err
    assert "line 6: malformed JSON" in err and "image file missing" in err
    assert layout_of(parquet) == "official"
    assert pq.ParquetFile(parquet).metadata.num_row_groups == 4

    # Text-only rows carry the stand-in like the official files.
    table = pq.read_table(parquet)
    text_only = [i for i, c in enumerate(table["conversations"].to_pylist()) if "<image>" not in c]
    assert {bytes(table["image_bytes"][i].as_py()[0]) for i in text_only} == {STANDIN}

    back, back_images = str(tmp_path / "back.jsonl"), str(tmp_path / "back_images")
    assert parquet_to_json(parquet, back, back_images, progress=False)["bad"] == 0
    originals = {r["id"]: normalized(r, images, "COCO_") for r in records}
    returned = {}
    for ref, record, error in read_records(back):
        assert error is None
        returned[record["id"]] = normalized(record, back_images)
    assert returned == originals
    # Identical bytes are written once, named by their hash with the right suffix.
    distinct = {p for _, _, pictures in originals.values() for p in pictures}
    names = sorted(os.listdir(back_images))
    assert len(names) == len(distinct) and all(n.endswith(".jpg") for n in names)


def test_identical_pictures_are_stored_once(tmp_path):
    """40 pictures used 9 times each, in random order: sorted into row groups and
    dictionary-encoded, each is stored about once (once more where a row group ends)."""
    source, images, records = write_source(tmp_path, n=400, shared=40, several=False)
    naive, deduped = str(tmp_path / "naive.parquet"), str(tmp_path / "deduped.parquet")
    json_to_parquet(source, images, naive, "COCO_", row_group_size=50, progress=False,
                    dedupe=False)
    json_to_parquet(source, images, deduped, "COCO_", row_group_size=50, progress=False)
    used = [normalized(r, images, "COCO_")[2][0] for r in records if r["image"]]
    text_and_overhead = os.path.getsize(naive) - sum(map(len, used)) - standin_bytes(records)
    assert 0 < text_and_overhead < os.path.getsize(naive) / 10
    row_groups = pq.ParquetFile(deduped).metadata.num_row_groups
    once = sum(map(len, set(used))) + row_groups * (max(map(len, used)) + len(STANDIN))
    assert os.path.getsize(deduped) < text_and_overhead + once < os.path.getsize(naive) / 4

    kept = str(tmp_path / "kept.parquet")
    json_to_parquet(source, images, kept, "COCO_", row_group_size=50, progress=False,
                    keep_order=True)
    assert pq.read_table(kept)["id"].to_pylist() == [r["id"] for r in records]
    assert pq.read_table(deduped)["id"].to_pylist() != [r["id"] for r in records]
    # Plain pyarrow reads the same rows from both.
    key = [("id", "ascending")]
    assert pq.read_table(deduped).sort_by(key).equals(pq.read_table(naive).sort_by(key))


def standin_bytes(records):
    """Bytes of the stand-ins the naive file holds, one per text-only record."""
    return len(STANDIN) * sum(not r["image"] for r in records)


def test_converting_the_hub_layout_to_json(files, tmp_path):
    out, images = str(tmp_path / "hub.json"), str(tmp_path / "hub_images")
    result = parquet_to_json(files["hub"], out, images, progress=False)
    good = [w for w in expected_of(files, "hub") if isinstance(w, RawRecord)]
    assert result["rows"] == len(good) and result["bad"] == len(files["hub_rows"]) - len(good)
    written = [record for _, record, _ in read_records(out)]  # a JSON list (.json)
    assert [(r["id"], r["conversations"]) for r in written] == [(w.record_id, w.turns)
                                                                 for w in good]
    assert [normalized(r, images)[2] for r in written] == [w.pictures for w in good]
    assert [r["image"] for r in written if r["image"] == ""] == [""] * sum(
        not w.pictures for w in good)


def test_outputs_are_written_atomically(tmp_path, monkeypatch, capsys):
    source, images, _ = write_source(tmp_path)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"the previous version")
    before = sorted(os.listdir(tmp_path))

    # --strict stops at the first bad record: nothing replaces the old output.
    code = convert_data.main(["--input", source, "--images_dir", images, "--image_prefix",
                              "COCO_", "--output", str(output), "--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "malformed JSON" in err[-1]
    assert output.read_bytes() == b"the previous version"

    # Killed half way through writing: the same.
    calls = []

    def dies_on_the_second_row_group(self, table, row_group_size=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, table, row_group_size=row_group_size)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", dies_on_the_second_row_group)
    with pytest.raises(KeyboardInterrupt):
        json_to_parquet(source, images, str(output), "COCO_", row_group_size=50,
                        progress=False)
    assert len(calls) == 2
    assert output.read_bytes() == b"the previous version"
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left behind
    monkeypatch.undo()

    assert convert_data.main(["--input", source, "--images_dir", images, "--image_prefix",
                              "COCO_", "--output", str(output)]) == 0
    assert pq.ParquetFile(str(output)).metadata.num_rows == 200
    capsys.readouterr()
    assert convert_data.main(["--input", str(output), "--output", str(tmp_path / "back.jsonl"),
                              "--images_dir", str(tmp_path / "back")]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == "no bad records"   # not "0 bad record(s) skipped"


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert convert_data.main(["--input", str(tmp_path / "no.jsonl"), "--images_dir",
                              str(tmp_path), "--output", str(tmp_path / "x.parquet")]) == 1
    assert convert_data.main(["--input", "a.jsonl", "--output", "b.txt"]) == 1
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1]}), bad)
    assert convert_data.main(["--input", str(bad), "--output", str(tmp_path / "c.parquet")]) == 1
    pictures = tmp_path / "pictures"   # a folder given as the input: no Parquet shards in it
    pictures.mkdir()
    assert convert_data.main(["--input", str(pictures), "--images_dir", str(pictures),
                              "--output", str(tmp_path / "d.parquet")]) == 1
    taken = tmp_path / "taken"
    taken.write_text("a file where the pictures folder should go")
    good = tmp_path / "good.parquet"
    write_official(good, official_rows(4))
    assert convert_data.main(["--input", str(good), "--output", str(tmp_path / "e.jsonl"),
                              "--images_dir", str(taken)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("error: ") for line in lines)
    assert "found columns [a]" in lines[2]
    assert lines[3] == f"error: {pictures} is a folder with no .parquet files: give a JSON/JSONL file, " \
                       f"or a folder of Parquet shards"
    assert lines[4] == f"error: {taken}: File exists"


def test_a_damaged_file_is_rewritten_never_and_converted_without_its_unreadable_rows(tmp_path, capsys):
    source = tmp_path / "good.parquet"
    write_official(source, official_rows(40), row_group_size=10)
    damaged = damaged_copy(source, tmp_path / "damaged.parquet", [(2, "conversations")])
    rewritten = tmp_path / "rewritten.parquet"
    assert convert_data.main(["--input", damaged, "--output", str(rewritten)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {damaged} is damaged (OSError: ") and "convert it to JSONL" in err[-1]
    assert not rewritten.exists()   # rewriting keeps every row: it does not write a file without some
    good = parquet_to_json(str(source), str(tmp_path / "all.jsonl"), str(tmp_path / "pictures"), progress=False)
    capsys.readouterr()
    result = parquet_to_json(damaged, str(tmp_path / "rows.jsonl"), str(tmp_path / "pictures"), progress=False)
    assert result["rows"] + result["bad"] == good["rows"] + good["bad"] == 40
    assert 0 < good["rows"] - result["rows"] <= 10   # the good rows of row group 2, and only those
    assert re.search(r"^ +10  unreadable row group$", capsys.readouterr().err, re.M)
