"""Parquet record source: conversations with their pictures inside the file.

Two layouts are recognised from the schema (each file of a spec on its own):

* official (MiniMind-V since 2025-12, `pretrain_i2t.parquet`, `sft_i2t.parquet`):
  `conversations` is a JSON string of [{"role", "content"}, ...] turns and `image_bytes` the
  encoded picture (binary), or a list of them for a row with several pictures.
* hub (what HF `datasets` writes for LLaVA): `conversations` is a list of {from, value} (or
  {role, content}) structs and `image` (or `images`) a {bytes, path} struct or plain binary,
  or a list of either.
An `id` column, if there is one, gives the record id. A clip goes in a `video_bytes` column
(the file's bytes; an optional `frames` column says how many keyframes, else the reader's
default): its row's one `<video>` mark becomes that many keyframes (dataset/records.py).

The `<image>` marks of a row's user turns say how many pictures it has: a row without marks is
text-only (pictures == [], whatever its picture column holds: the official files put an 8x8
black JPEG there), a row with k marks must hold exactly k pictures.

Built for files of millions of rows:
* the index is O(row groups) per file plus `approx_lengths` (one int32 a row), computed with
  vectorised Arrow kernels from the text column alone, so building it reads no picture;
* rows are read on demand: `read(i)` decodes the row group that holds row i (only the columns
  it needs) and keeps recently used row groups in a small LRU bounded in bytes, so neighbouring
  rows are cheap; `with_pictures=False` never reads the picture column;
* files are opened lazily in each process, so the object pickles without file handles and
  every DataLoader worker (fork or spawn) opens its own;
* reads are plain positioned reads of the needed column chunks, not a memory map (unless
  memory_map=True): as fast here, and a mapped file's touched pages count in every worker's
  RSS (an epoch of random reads maps in the whole file, which looks like a leak and can
  trip RSS-based job limits), while buffered reads keep RSS at the LRU's size.
Random access decodes a whole row group, so files with huge row groups get a warning at index
time: `scripts/convert_data.py` rewrites them with small ones.
"""
import bisect
import glob
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataset.records import BadRecord, RawRecord, expand_clip, valid_unicode
from model.prompt import DEFAULT_FRAMES, VIDEO_MARK
from model.config import IMAGE_MARK, IMAGE_PLACEHOLDER_IDS

logger = logging.getLogger(__name__)

TEXT_COLUMN = "conversations"
PICTURE_COLUMNS = ("image_bytes", "image", "images")  # the first one a file has is used
ID_COLUMN = "id"
VIDEO_COLUMN = "video_bytes"
FRAMES_COLUMN = "frames"
USER_ROLES = ("user", "human")

# approx_lengths: about one token per character, plus the placeholder of every picture and
# the chat template around every turn (the same estimate as the JSON source's).
TOKENS_PER_PICTURE = len(IMAGE_PLACEHOLDER_IDS)
TEMPLATE_TOKENS_PER_TURN = 8
# What json.dumps puts around a turn's text: '{"role": "user", "content": ""}, ' (33 chars;
# 38 for an assistant turn): the official JSON string is longer than the text by that much.
JSON_CHARS_PER_TURN = 35

DEFAULT_CACHE_BYTES = 256 << 20
# Row groups bigger than this make every random read expensive (it decodes the whole group).
LARGE_ROW_GROUP_ROWS = 10_000
LARGE_ROW_GROUP_BYTES = 256 << 20
INDEX_BATCH_ROWS = 16 * 1024   # text rows per vectorised length-estimate batch
STREAM_BATCH_ROWS = 256        # rows per batch in iter_pictures (pictures: keep batches small)

_NOT_UTF8 = object()  # stands for a stored value whose bytes are not valid UTF-8


# ---- specs --------------------------------------------------------------------------------

def parquet_files(spec: str) -> List[str]:
    """The files a data spec names: one .parquet file, a folder of shards (its *.parquet files,
    sorted) or a glob pattern (its matches, sorted)."""
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(glob.escape(spec), "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{spec}: no .parquet files in this folder")
        return files
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"{spec}: no file matches this pattern")
        return files
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{spec}: no such file")
    return [spec]


def is_parquet(spec: str) -> bool:
    """Does this data spec name Parquet data? Looks at names only, opens no file."""
    if os.path.isdir(spec):
        return any(name.lower().endswith(".parquet") for name in os.listdir(spec))
    return spec.lower().endswith(".parquet")  # a file, or a glob such as "shards/*.parquet"


# ---- layout -------------------------------------------------------------------------------

@dataclass
class _FileIndex:
    """What ParquetRecords keeps of one file: its layout and where its row groups start."""
    path: str
    text_is_json: bool            # official: a JSON string; hub: a list of turn structs
    picture_column: Optional[str]   # None: a file of clips only
    picture_leaves: List[str]     # Parquet paths of the picture bytes, read as dictionaries
    id_column: Optional[str]
    video_column: Optional[str]
    frames_column: Optional[str]
    row_group_starts: np.ndarray  # int64 [row groups + 1]: file-local first row of each group
    text_bytes: np.ndarray        # int64 [row groups]: decoded size of the text (+ id) columns
    picture_bytes: np.ndarray     # int64 [row groups]: decoded size of the picture column

    @property
    def n_rows(self) -> int:
        return int(self.row_group_starts[-1])


def _not_ours(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: not a MiniMind-V or LLaVA Parquet file: {why}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_picture_type(t: pa.DataType) -> bool:
    if _is_list(t):
        t = t.value_type
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_picture_type(t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _describe(path: str, pf: pq.ParquetFile) -> _FileIndex:
    """Detect the layout of an open file from its schema; ValueError (one line) if unknown."""
    schema = pf.schema_arrow
    names = schema.names
    picture = next((c for c in PICTURE_COLUMNS if c in names), None)
    video = VIDEO_COLUMN if VIDEO_COLUMN in names else None
    if TEXT_COLUMN not in names or (picture is None and video is None):
        raise _not_ours(path, f"found columns [{', '.join(names)}]; expected conversations + "
                              f"image_bytes (or conversations + image, or conversations + video_bytes)")
    text_type = schema.field(TEXT_COLUMN).type
    if pa.types.is_string(text_type) or pa.types.is_large_string(text_type):
        text_is_json = True
    elif _is_list(text_type) and pa.types.is_struct(text_type.value_type):
        text_is_json = False
    else:
        raise _not_ours(path, f"column 'conversations' is {text_type}; expected a JSON string "
                              f"or a list of {{from, value}} structs")
    if picture is not None and not _is_picture_type(schema.field(picture).type):
        raise _not_ours(path, f"column {picture!r} is {schema.field(picture).type}; expected "
                              f"binary, a {{bytes, path}} struct, or a list of either")
    # The byte leaves only (not a struct's "path"): read as dictionaries, a picture that
    # several rows of a row group share is decoded and held once.
    leaves = [pf.schema.column(k).path for k in range(len(pf.schema))]
    picture_leaves = [p for p in leaves
                      if p.split(".")[0] == picture and p.split(".")[-1] != "path"]
    md = pf.metadata
    rows = [md.row_group(r).num_rows for r in range(md.num_row_groups)]

    def column_bytes(wanted):
        return np.array([sum(md.row_group(r).column(c).total_uncompressed_size for c in range(md.num_columns)
                             if md.row_group(r).column(c).path_in_schema.split(".")[0] in wanted)
                         for r in range(md.num_row_groups)], dtype=np.int64)

    return _FileIndex(path=path, text_is_json=text_is_json, picture_column=picture,
                      picture_leaves=picture_leaves,
                      id_column=ID_COLUMN if ID_COLUMN in names else None, video_column=video,
                      frames_column=FRAMES_COLUMN if video and FRAMES_COLUMN in names else None,
                      row_group_starts=np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]),
                      text_bytes=column_bytes({TEXT_COLUMN, ID_COLUMN, FRAMES_COLUMN}),
                      picture_bytes=column_bytes({picture, video}))


def _open_parquet(path: str, memory_map: bool = False) -> pq.ParquetFile:
    try:
        # No pre-buffering: by default the reader fetches the chunks of every row group up
        # front, i.e. while indexing the whole compressed text column at once.
        return pq.ParquetFile(path, memory_map=memory_map, pre_buffer=False)
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split()).split(". ")[0]
        raise ValueError(f"{path}: not a Parquet file, or one cut short ({reason})") from None


def layout_of(path: str) -> str:
    """"official" or "hub", from the file's schema (reads the footer only); ValueError (one
    line) if the file is not Parquet or not a layout this module reads."""
    with _open_parquet(path) as pf:
        index = _describe(path, pf)
    return "official" if index.text_is_json and index.picture_column == "image_bytes" else "hub"


def _warn_if_row_groups_are_large(path: str, md: pq.FileMetaData) -> None:
    if md.num_row_groups == 0:
        return
    most_rows = max(md.row_group(r).num_rows for r in range(md.num_row_groups))
    most_bytes = max(md.row_group(r).total_byte_size for r in range(md.num_row_groups))
    if most_rows > LARGE_ROW_GROUP_ROWS or most_bytes > LARGE_ROW_GROUP_BYTES:
        logger.warning(
            "%s: row groups of up to %d rows / %d MB; every random read decodes a whole row "
            "group, so reading this file in random order will be slow. Rewrite it with small "
            "row groups (pictures unchanged): python scripts/convert_data.py --input %s "
            "--output NEW.parquet", path, most_rows, most_bytes >> 20, path)


# ---- length estimates (vectorised, no JSON parsing) ---------------------------------------

def _numpy(array) -> np.ndarray:
    return pc.fill_null(array, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def arrow_reason(error: Exception) -> str:
    """An Arrow error in one line (its messages run over several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _text_lengths(path: str, pf: pq.ParquetFile, text_is_json: bool) -> List[np.ndarray]:
    """Length estimates of every row of a file, in batches. A damaged row group (a download cut
    or corrupted in the middle) would stop the whole read: then the file is read again group by
    group, and the rows of each unreadable one get 0 here; reading them later raises BadRecord,
    so they are counted and skipped like any bad record (or stop a --strict run)."""
    try:
        return [_estimate_lengths(batch.column(0), text_is_json)
                for batch in pf.iter_batches(batch_size=INDEX_BATCH_ROWS, columns=[TEXT_COLUMN])]
    except (OSError, pa.ArrowException):
        pass
    lengths = []
    for group in range(pf.metadata.num_row_groups):
        try:
            column = pf.read_row_group(group, columns=[TEXT_COLUMN], use_threads=False).column(0)
            lengths.append(_estimate_lengths(column.combine_chunks(), text_is_json))
        except (OSError, pa.ArrowException) as e:
            rows = pf.metadata.row_group(group).num_rows
            logger.warning("%s row group %d is unreadable (%s): its %d rows will be skipped", path, group,
                           arrow_reason(e), rows)
            lengths.append(np.zeros(rows, dtype=np.int32))
    return lengths


def _estimate_lengths(column, text_is_json: bool) -> np.ndarray:
    """int32 token-length estimates for one batch of the text column."""
    if text_is_json:
        chars = _numpy(pc.utf8_length(column))
        marks = _numpy(pc.count_substring(column, IMAGE_MARK))
        turns = _numpy(pc.count_substring(column, '"content"')) + _numpy(
            pc.count_substring(column, '"value"'))
        # An escape ("\n", "\"", "\u4e2d") is several characters in the JSON, one in the text.
        escapes = _numpy(pc.count_substring(column, "\\"))
        unicode_escapes = _numpy(pc.count_substring(column, "\\u"))
        chars = chars - escapes - 4 * unicode_escapes - JSON_CHARS_PER_TURN * turns
    else:
        # Work on all turns of the batch at once, then sum the turns of each row.
        turns_flat = pc.list_flatten(column)
        fields = [f.name for f in turns_flat.type]
        texts = [turns_flat.field(name) for name in ("value", "content") if name in fields]
        text = pc.coalesce(*texts) if texts else pa.nulls(len(turns_flat), pa.string())
        row_of_turn = pc.list_parent_indices(column).to_numpy()
        chars = np.bincount(row_of_turn, weights=_numpy(pc.utf8_length(text)),
                            minlength=len(column)).astype(np.int64)
        marks = np.bincount(row_of_turn, weights=_numpy(pc.count_substring(text, IMAGE_MARK)),
                            minlength=len(column)).astype(np.int64)
        turns = _numpy(pc.list_value_length(column))
    estimate = (chars - len(IMAGE_MARK) * marks + TOKENS_PER_PICTURE * marks
                + TEMPLATE_TOKENS_PER_TURN * turns)
    return np.clip(estimate, 0, np.iinfo(np.int32).max).astype(np.int32)


# ---- one row: Arrow values -> turns and pictures ------------------------------------------

def _value(column, offset: int):
    """The Python value of one cell; _NOT_UTF8 if it holds text that is not UTF-8."""
    try:
        return column[offset].as_py()
    except UnicodeDecodeError:
        return _NOT_UTF8


def _values(column) -> list:
    """Python values of a whole (small) column; one bad cell does not spoil the others."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_value(column, k) for k in range(len(column))]


def _parse_turns(value, text_is_json: bool) -> list:
    """The turns of a row as stored; BadRecord if the text cannot be read as a list of them."""
    if value is None:
        raise BadRecord("missing field: 'conversations' is null")
    if value is _NOT_UTF8:
        raise BadRecord("text is not valid UTF-8")
    if text_is_json:
        try:
            turns = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(turns, list):
            raise BadRecord("wrong field type: 'conversations' must be a list")
        # The stored text is valid UTF-8 (_value checked it): only a "\\udXXX" escape can
        # put a lone surrogate into the parsed turns, so rows without escapes skip the walk.
        if "\\u" in value and not valid_unicode(turns):
            raise BadRecord("text is not valid UTF-8")
        return turns
    # HF gives every struct all the fields seen in the file, absent ones as null: drop
    # those, so a {from, value} turn does not also claim a role. (Arrow's strings are valid
    # UTF-8 here: _value turned any that were not into _NOT_UTF8.)
    return [t if t is None else {k: v for k, v in t.items() if v is not None} for t in value]


def _user_marks(turns: list) -> Tuple[int, int]:
    """How many picture and clip marks the user turns hold; BadRecord for a turn without text."""
    pictures = clips = 0
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord(f"bad turn: turn {k} is not an object")
        role, text = ((turn.get("from"), turn.get("value")) if "from" in turn
                      else (turn.get("role"), turn.get("content")))
        if not isinstance(text, str):
            raise BadRecord(f"bad turn: turn {k} has no string value/content")
        if role in USER_ROLES:
            pictures += text.count(IMAGE_MARK)
            clips += text.count(VIDEO_MARK)
    return pictures, clips


def _pictures(value, marks: int) -> List[bytes]:
    """The encoded pictures of a row with `marks` marks (> 0), checked present and counted."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    if not items:
        raise BadRecord(f"missing picture: {marks} {IMAGE_MARK} mark(s) but no picture stored")
    if len(items) != marks:
        raise BadRecord(f"image count mismatch: {marks} {IMAGE_MARK} mark(s) in user turns "
                        f"but {len(items)} picture(s)")
    pictures = []
    for n, item in enumerate(items, 1):
        data = item.get("bytes") if isinstance(item, dict) else item
        if not data:
            path = item.get("path") if isinstance(item, dict) else None
            raise BadRecord(f"missing picture: picture {n} has no bytes"
                            + (f" (only a path: {path!r})" if path else ""))
        pictures.append(data)
    return pictures


def _first_at_or_after(start: int, step: int, position: int) -> int:
    """The first of start, start + step, ... that is >= position."""
    if position <= start:
        return start
    return start + -(-(position - start) // step) * step


# ---- the source ---------------------------------------------------------------------------

class _RowGroupCache:
    """Decoded row groups (Arrow tables), least recently used out first, bounded in bytes.

    A table bigger than the whole bound is handed out but not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._tables = OrderedDict()

    def get(self, key, load) -> pa.Table:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = load()
        if table.nbytes <= self.max_bytes:
            self._tables[key] = table
            self.nbytes += table.nbytes
            while self.nbytes > self.max_bytes:
                _, oldest = self._tables.popitem(last=False)
                self.nbytes -= oldest.nbytes
        return table

    def __len__(self) -> int:
        return len(self._tables)


class ParquetRecords:
    """Records of one or more Parquet files (a spec as for `parquet_files`), read on demand.

    Row i is the i-th row of the files in order. `read(i)` gives a RawRecord or raises
    BadRecord; `approx_lengths[i]` is a cheap token-length estimate of row i.
    """

    def __init__(self, spec: str, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 memory_map: bool = False, frames: int = DEFAULT_FRAMES):
        self.spec, self.frames = spec, frames
        self.cache_bytes = cache_bytes
        self.memory_map = memory_map
        self._files: List[_FileIndex] = []
        lengths = []
        for path in parquet_files(spec):
            with _open_parquet(path, memory_map) as pf:
                index = _describe(path, pf)
                _warn_if_row_groups_are_large(path, pf.metadata)
                lengths += _text_lengths(path, pf, index.text_is_json)
            self._files.append(index)
        self._file_starts = np.cumsum([0] + [f.n_rows for f in self._files], dtype=np.int64)
        self.approx_lengths = (np.concatenate(lengths) if lengths
                               else np.zeros(0, dtype=np.int32))
        del lengths
        pa.default_memory_pool().release_unused()  # the allocator would keep the text batches
        self._start_process()

    # ---- per-process state: open files and the row-group cache ----------------------------

    def _start_process(self) -> None:
        self._pid = os.getpid()
        self._open = {}
        self._cache = _RowGroupCache(self.cache_bytes)
        # _locate's search tables as Python lists: bisect on them costs a fraction of a
        # numpy searchsorted call, and _locate runs for every row read.
        self._file_start_list = self._file_starts.tolist()
        self._group_start_lists = [f.row_group_starts.tolist() for f in self._files]

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_pid", "_open", "_cache", "_file_start_list", "_group_start_lists"):
            # handles and caches belong to one process; the search lists are rebuilt
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start_process()

    def _in_this_process(self) -> None:
        if self._pid != os.getpid():  # a forked child: never use the parent's handles
            self._start_process()

    def _parquet_file(self, file_no: int) -> pq.ParquetFile:
        self._in_this_process()
        if file_no not in self._open:
            f = self._files[file_no]
            self._open[file_no] = pq.ParquetFile(f.path, memory_map=self.memory_map,
                                                 read_dictionary=f.picture_leaves)
        return self._open[file_no]

    def _row_group(self, file_no: int, row_group: int, part: str) -> pa.Table:
        """The text (+ id) or the picture column of a row group, decoded, via the LRU."""
        f = self._files[file_no]
        columns = {"text": [TEXT_COLUMN, f.id_column, f.frames_column],
                   "pictures": [f.picture_column], "video": [f.video_column]}[part]
        columns = [c for c in columns if c]

        def load():
            try:
                return self._parquet_file(file_no).read_row_group(row_group, columns=columns,
                                                                  use_threads=False)
            except (OSError, pa.ArrowException) as e:
                raise BadRecord(f"unreadable row group: {f.path} row group {row_group} ({arrow_reason(e)})") from None

        self._in_this_process()
        return self._cache.get((file_no, row_group, part), load)

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded row groups this process holds in its LRU (<= cache_bytes)."""
        return self._cache.nbytes

    # ---- rows -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def read_groups(self, with_pictures: bool = True) -> Tuple[np.ndarray, int]:
        """(the first row of every row group, plus the end; how many row groups this process's
        LRU holds at once): rows of one row group are cheap to read together, so a shuffle that
        keeps to a window of that many row groups at a time decodes each about once."""
        starts = [self._file_starts[k] + f.row_group_starts[:-1] for k, f in enumerate(self._files)]
        sizes = np.concatenate([f.text_bytes + (f.picture_bytes if with_pictures else 0) for f in self._files]
                               or [np.zeros(0, dtype=np.int64)])
        largest = int(sizes.max()) if len(sizes) else 1
        return np.concatenate(starts + [[len(self)]]).astype(np.int64), max(1, self.cache_bytes // max(largest, 1))

    @property
    def fingerprint(self) -> str:
        """Names these files as they are now (paths, sizes, modification times): what a row
        holds cannot change without it changing, so work keyed on it (the feature cache's
        sample -> picture map) can be reused."""
        h = hashlib.sha1()
        for f in self._files:
            st = os.stat(f.path)
            h.update(f"{os.path.realpath(f.path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    @property
    def paths(self) -> List[str]:
        return [f.path for f in self._files]

    def _locate(self, i: int) -> Tuple[int, int, int]:
        """(file number, row group, row within the group) of row i."""
        file_starts = self._file_start_list
        if not 0 <= i < file_starts[-1]:
            raise IndexError(f"row {i} out of range (0..{file_starts[-1] - 1})")
        file_no = bisect.bisect_right(file_starts, i) - 1
        starts = self._group_start_lists[file_no]
        local = int(i) - file_starts[file_no]
        row_group = bisect.bisect_right(starts, local) - 1
        return file_no, row_group, local - starts[row_group]

    def ref(self, i: int) -> str:
        """Where row i is, for messages: "<path> row <row in the file>" (+ " (id=...)").

        The same row always gets the same ref. The id costs at most one read of the row
        group's text, which read() has usually cached already.
        """
        file_no, row_group, offset = self._locate(i)
        f = self._files[file_no]
        ref = f"{f.path} row {int(f.row_group_starts[row_group]) + offset}"
        if f.id_column:
            try:
                record_id = _value(self._row_group(file_no, row_group, "text").column(f.id_column), offset)
            except BadRecord:
                return ref
            if record_id is not None and record_id is not _NOT_UTF8:
                ref += f" (id={record_id!r})"
        return ref

    def read(self, i: int, with_pictures: bool = True) -> RawRecord:
        """Row i as a RawRecord; BadRecord if it is unusable.

        with_pictures=False reads the text only (pictures == []) and so cannot check them.
        Text-only rows never read their picture column.
        """
        file_no, row_group, offset = self._locate(i)
        f = self._files[file_no]
        text = self._row_group(file_no, row_group, "text")
        turns = _parse_turns(_value(text.column(TEXT_COLUMN), offset), f.text_is_json)
        record_id = _value(text.column(f.id_column), offset) if f.id_column else None
        if record_id is _NOT_UTF8:
            raise BadRecord("text is not valid UTF-8: the id")
        frames = _value(text.column(f.frames_column), offset) if f.frames_column else None

        def stored(part):
            column = f.picture_column if part == "pictures" else f.video_column
            return _value(self._row_group(file_no, row_group, part).column(0), offset) if column else None

        turns, pictures = self._turns_and_pictures(turns, stored, frames, with_pictures)
        return RawRecord(record_id, turns, pictures)

    def _turns_and_pictures(self, turns, stored, frames, with_pictures: bool):
        """A row's turns (a clip's mark expanded into its keyframes) and pictures; `stored(part)`
        gives the row's "pictures" or "video" cell, read only when needed."""
        marks, clip_marks = _user_marks(turns)
        if clip_marks:
            video = stored("video") if with_pictures else None
            if with_pictures and not video:
                raise BadRecord(f"missing picture: a {VIDEO_MARK} mark but no clip stored")
            turns, clip = expand_clip(turns, video, self.frames if frames is None else frames)
            return turns, clip if with_pictures else []
        return turns, _pictures(stored("pictures"), marks) if with_pictures and marks else []

    def iter_pictures(self, start: int = 0, stop: Optional[int] = None,
                      step: int = 1) -> Iterator[Tuple[int, List[bytes]]]:
        """(row, pictures) for rows start, start + step, ... < stop, streamed in file order.

        Reads only the text and picture columns, a few hundred rows at a time, and skips row
        groups holding no wanted row. Pictures follow read()'s rules; a row that read() would
        reject (bad text, missing picture, count mismatch, unreadable row group) yields [],
        read(i) says why.
        """
        if step < 1:
            raise ValueError(f"step must be >= 1, not {step}")
        stop = len(self) if stop is None else min(stop, len(self))
        for file_no, f in enumerate(self._files):
            file_start = int(self._file_starts[file_no])
            for row_group in range(len(f.row_group_starts) - 1):
                lo = file_start + int(f.row_group_starts[row_group])
                hi = file_start + int(f.row_group_starts[row_group + 1])
                if lo >= stop:
                    return
                wanted = range(_first_at_or_after(start, step, lo), min(hi, stop), step)
                if wanted:
                    yield from self._stream_row_group(file_no, row_group, lo, wanted)

    def _stream_row_group(self, file_no: int, row_group: int, lo: int, wanted: range):
        """(row, pictures) for the wanted rows of the row group whose first row is `lo`."""
        f = self._files[file_no]
        next_row = wanted.start
        try:
            columns = [c for c in (TEXT_COLUMN, f.picture_column, f.video_column, f.frames_column) if c]
            batches = self._parquet_file(file_no).iter_batches(
                batch_size=STREAM_BATCH_ROWS, row_groups=[row_group], use_threads=False, columns=columns)
            for batch in batches:
                rows = np.arange(next_row, min(lo + batch.num_rows, wanted.stop), wanted.step)
                if len(rows):
                    chosen = batch.take(pa.array(rows - lo))
                    cells = {name: _values(chosen.column(name)) for name in columns}
                    for k, i in enumerate(rows.tolist()):
                        yield i, self._pictures_or_empty(f, {name: values[k] for name, values in cells.items()})
                    next_row = int(rows[-1]) + wanted.step
                lo += batch.num_rows
        except (OSError, pa.ArrowException):
            # An unreadable row group: its rows are rejected by read(), so they yield [].
            for i in range(next_row, wanted.stop, wanted.step):
                yield i, []

    def _pictures_or_empty(self, f: _FileIndex, row: dict) -> list:
        parts = {"pictures": f.picture_column, "video": f.video_column}
        try:
            turns = _parse_turns(row[TEXT_COLUMN], f.text_is_json)
            return self._turns_and_pictures(turns, lambda part: row.get(parts[part]),
                                            row.get(f.frames_column), True)[1]
        except BadRecord:
            return []
