"""Convert MiniMind-V data between JSON/JSONL + an image folder and Parquet (pictures inside).

    # JSON/JSONL + image folder -> Parquet in the official MiniMind-V layout
    python scripts/convert_data.py --input sft_data.jsonl --images_dir sft_images --output sft.parquet
    # Parquet (official or LLaVA hub layout; a file, a folder of shards or a glob) -> JSONL + images
    python scripts/convert_data.py --input sft_i2t.parquet --output sft.jsonl --images_dir sft_imgs
    # Parquet -> Parquet with small row groups, for fast random access (pictures unchanged)
    python scripts/convert_data.py --input sft_i2t.parquet --output sft_small.parquet

The direction follows from the names: Parquet in or out. Outputs are written to a temporary
file and renamed at the end, so a killed conversion never leaves a half file under the final
name. Bad records are reported one line each and skipped (--strict: stop at the first one);
the exit code is 1 only if the conversion itself failed.

Parquet output: `conversations` is a JSON string of {"role", "content"} turns, `image_bytes`
the picture file's bytes as they are (never re-encoded), a list of them if any record has
several pictures, an 8x8 black JPEG for text-only records (like the official files); `id` is
kept if the records have one. A picture that several rows use is stored once per row group:
the picture column is dictionary-encoded (with a dictionary page big enough for a whole row
group) and rows are sorted by their picture files first, so rows sharing one land in the same
row group (--keep_order: no sorting). Plain pyarrow reads the file as usual.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from collections import Counter
from typing import Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # scripts/ is a subfolder: make `dataset` and `model` importable
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.parquet import (PICTURE_COLUMNS, ParquetRecords, arrow_reason, is_parquet,  # noqa: E402
                             layout_of, parquet_files)
from dataset.records import (BadRecord, Frame, IMAGE_PREFIX_HELP, JsonRecords, check_json_file,  # noqa: E402
                             conversation)
from model.checkpoint import atomic_output  # noqa: E402
from model.config import number_in  # noqa: E402

DEFAULT_ROW_GROUP_SIZE = 1000
# The dictionary page holds the distinct pictures of a row group; past this limit the writer
# falls back to plain encoding (still correct, no longer deduplicated). Parquet page sizes
# are 32-bit, so stay well below 2 GiB.
DICTIONARY_PAGE_LIMIT = 1 << 30
STAGING_BATCH = 4096  # records per batch of the text-only staging file (pass 1)
PICTURE_SUFFIXES = [(b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"),
                    (b"GIF87a", ".gif"), (b"GIF89a", ".gif"), (b"BM", ".bmp")]


class ConversionError(Exception):
    """Stops a conversion; the message is one line for the user."""


# ---- shared helpers -----------------------------------------------------------------------

class Problems:
    """Bad records: one line each as they come, a count per kind at the end."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.kinds = Counter()

    def add(self, ref: str, reason: str) -> None:
        if self.strict:
            raise ConversionError(f"{ref}: {reason} (--strict)")
        self.kinds[reason.partition(":")[0]] += 1
        tqdm.write(f"{ref}: {reason}", file=sys.stderr)

    def summary(self) -> str:
        if not self.kinds:
            return "no bad records"
        lines = [f"{sum(self.kinds.values())} bad record(s) skipped:"]
        lines += [f"  {n:6d}  {kind}" for kind, n in self.kinds.most_common()]
        return "\n".join(lines)


def standin_picture() -> bytes:
    """The picture of a text-only row: an 8x8 black JPEG, as in the official files."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG")
    return out.getvalue()


def picture_suffix(data: bytes) -> str:
    for magic, suffix in PICTURE_SUFFIXES:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".bin"  # not a format we know: keep the bytes, the dataset will report them


def _writer_options(schema: pa.Schema, picture_leaves: List[str]) -> dict:
    """ParquetWriter options: dictionary-encode (dedupe) and leave uncompressed the picture
    bytes (JPEG does not compress), zstd and statistics for the rest."""
    leaves = _leaf_paths(schema)
    return dict(use_dictionary=picture_leaves, dictionary_pagesize_limit=DICTIONARY_PAGE_LIMIT,
                compression={p: ("none" if p in picture_leaves else "zstd") for p in leaves},
                write_statistics=[p for p in leaves if p not in picture_leaves])


def _leaf_paths(schema: pa.Schema) -> List[str]:
    """Parquet column paths of an Arrow schema's leaves ("image_bytes.list.element", ...),
    which the writer options are keyed by; pyarrow names them only in a written file."""
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer)
    parquet_schema = pq.ParquetFile(pa.BufferReader(buffer.getvalue())).schema
    return [parquet_schema.column(k).path for k in range(len(parquet_schema))]


def _picture_leaves(schema: pa.Schema, picture_column: str) -> List[str]:
    return [p for p in _leaf_paths(schema)
            if p.split(".")[0] == picture_column and p.split(".")[-1] != "path"]


# ---- JSON/JSONL + image folder -> Parquet -------------------------------------------------

STAGING_SCHEMA = pa.schema([("conversations", pa.string()), ("pictures", pa.list_(pa.string())),
                            ("id", pa.string())])  # id as JSON: its type is settled in pass 2


def _stage_records(data_path, images_dir, image_prefix, staging_path, problems, progress):
    """Pass 1: check every record and write the good ones, text and picture paths only, to an
    Arrow file. Returns the Python types the ids had."""
    id_types = set()
    columns = {name: [] for name in STAGING_SCHEMA.names}
    with pa.OSFile(staging_path, "wb") as sink, pa.ipc.new_file(sink, STAGING_SCHEMA) as out:
        def flush():
            out.write_batch(pa.record_batch([columns[n] for n in STAGING_SCHEMA.names],
                                            schema=STAGING_SCHEMA))
            for values in columns.values():
                values.clear()

        records = JsonRecords(data_path, images_dir, image_prefix)   # checks every record once
        if records.prefix_note:
            tqdm.write(records.prefix_note, file=sys.stderr)
        for ref, reason in records.load_problems:
            problems.add(ref, reason)
        for i in tqdm(range(len(records)), desc="staging records", unit=" records", disable=not progress):
            try:
                raw = records.read(i)
                if any(isinstance(p, Frame) for p in raw.pictures):
                    raise BadRecord("a clip record: only picture records are converted (keep clips as JSONL "
                                    "+ files, or write their bytes to a video_bytes column)")
                turns = conversation(raw.turns, len(raw.pictures))
            except BadRecord as bad:   # changed since the first pass, or a clip
                problems.add(records.ref(i), str(bad))
                continue
            has_id = raw.record_id is not None
            columns["conversations"].append(json.dumps(turns, ensure_ascii=False))
            columns["pictures"].append(raw.pictures)
            columns["id"].append(json.dumps(raw.record_id) if has_id else None)
            if has_id:
                id_types.add(type(raw.record_id))
            if len(columns["conversations"]) >= STAGING_BATCH:
                flush()
        flush()
    return id_types


def _id_array(json_ids: pa.Array, id_types: set) -> pa.Array:
    """The ids in the column type they all share: int64, string, else their JSON text."""
    values = [None if v is None else json.loads(v) for v in json_ids.to_pylist()]
    if id_types == {int}:
        return pa.array(values, pa.int64())
    if id_types == {str}:
        return pa.array(values, pa.string())
    return json_ids  # mixed types (or floats, lists...): kept as their JSON text


def _picture_values(paths_per_row, several: bool, standin: bytes):
    """The picture column of one row group: every file read once (in a row group a shared file
    is read once), the stand-in for text-only rows. Returns (values, how many of them are
    distinct, how many there are)."""
    files = {}
    values = []
    for paths in paths_per_row:
        for path in paths:
            if path not in files:
                with open(path, "rb") as f:
                    files[path] = f.read()
        data = [files[p] for p in paths] or [standin]
        values.append(data if several else data[0])
    text_only = sum(not paths for paths in paths_per_row)
    return values, len(files) + (text_only > 0), sum(map(len, paths_per_row)) + text_only


def json_to_parquet(data_path: str, images_dir: str, output: str, image_prefix: Optional[str] = None,
                    row_group_size: int = DEFAULT_ROW_GROUP_SIZE, keep_order: bool = False,
                    strict: bool = False, progress: bool = True, dedupe: bool = True) -> dict:
    """Convert a JSON/JSONL file and its image folder into one Parquet file (official layout).

    Two passes, memory bounded by a row group: check the records and stage their text in a
    temporary Arrow file, then write row group by row group, reading the pictures.
    Returns counts: rows, bad records, picture values stored, bytes written.
    dedupe=False writes the naive file (input order, no dictionary), for comparison.
    """
    problems = Problems(strict)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=folder) as staging_dir:
        staging_path = os.path.join(staging_dir, "records.arrow")
        id_types = _stage_records(data_path, images_dir, image_prefix, staging_path, problems,
                                  progress)
        with pa.memory_map(staging_path) as source:  # zero-copy: the text stays on disk
            staged = pa.ipc.open_file(source).read_all()
            n_rows = len(staged)
            order = np.arange(n_rows, dtype=np.int64)
            if dedupe and not keep_order:
                # Rows that share pictures become neighbours, so they share a row group and
                # with it the row group's dictionary: each picture is stored once there.
                key = pc.binary_join(staged.column("pictures"), "\n")
                order = pc.sort_indices(pc.fill_null(key, "")).to_numpy()
            several = n_rows and pc.max(pc.list_value_length(staged["pictures"])).as_py() > 1
            picture_type = pa.list_(pa.binary()) if several else pa.binary()
            fields = [("id", pa.int64() if id_types == {int} else pa.string())] if id_types else []
            schema = pa.schema(fields + [("conversations", pa.string()),
                                         ("image_bytes", picture_type)])
            options = _writer_options(schema, _picture_leaves(schema, "image_bytes"))
            if not dedupe:
                options.update(use_dictionary=False)
            standin = standin_picture()
            stored = 0  # picture values in the file: distinct ones per row group if deduped
            with atomic_output(output) as tmp, pq.ParquetWriter(tmp, schema, **options) as out:
                for start in tqdm(range(0, n_rows, row_group_size), desc="writing",
                                  unit=" row groups", disable=not progress):
                    # take() copies only this row group's text out of the memory map.
                    rows = staged.take(order[start:start + row_group_size])
                    values, distinct, total = _picture_values(
                        rows.column("pictures").to_pylist(), several, standin)
                    stored += distinct if dedupe else total
                    columns = {"conversations": rows.column("conversations"),
                               "image_bytes": pa.array(values, picture_type)}
                    if id_types:
                        columns["id"] = _id_array(rows.column("id").combine_chunks(), id_types)
                    del rows
                    out.write_table(pa.table([columns[name] for name in schema.names],
                                             schema=schema), row_group_size=row_group_size)
            del staged  # release the memory map before the staging folder goes
    if problems.kinds or progress:
        print(problems.summary(), file=sys.stderr)
    return {"rows": n_rows, "bad": sum(problems.kinds.values()), "pictures_stored": stored,
            "bytes": os.path.getsize(output)}


# ---- Parquet -> JSON/JSONL + image folder -------------------------------------------------

def _save_picture(data: bytes, images_dir: str, saved: set) -> str:
    """Write a picture as <hash of its bytes><suffix> once; return the file name."""
    name = hashlib.sha256(data).hexdigest()[:32] + picture_suffix(data)
    if name not in saved:
        path = os.path.join(images_dir, name)
        if not os.path.exists(path):
            with atomic_output(path, sync=False) as tmp, open(tmp, "wb") as f:
                f.write(data)
        saved.add(name)
    return name


def parquet_to_json(spec: str, output: str, images_dir: str, strict: bool = False,
                    progress: bool = True) -> dict:
    """Convert Parquet records (either layout) into a JSONL file (a JSON list if `output`
    ends with .json) and a folder of picture files. Returns counts."""
    records = ParquetRecords(spec)
    problems = Problems(strict)
    os.makedirs(images_dir, exist_ok=True)
    as_list = output.lower().endswith(".json")
    saved, written = set(), 0
    with atomic_output(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[\n" if as_list else "")
        for i in tqdm(range(len(records)), desc="converting", unit=" rows",
                      disable=not progress):
            try:
                record = records.read(i)
            except BadRecord as bad:
                problems.add(records.ref(i), str(bad))
                continue
            entry = {} if record.record_id is None else {"id": record.record_id}
            entry["image"] = ", ".join(_save_picture(p, images_dir, saved)
                                       for p in record.pictures)
            entry["conversations"] = record.turns
            separator = (",\n" if written else "") if as_list else ""
            out.write(separator + json.dumps(entry, ensure_ascii=False) + ("" if as_list else "\n"))
            written += 1
        out.write("\n]\n" if as_list else "")
    if problems.kinds or progress:
        print(problems.summary(), file=sys.stderr)
    return {"rows": written, "bad": sum(problems.kinds.values()), "pictures": len(saved)}


# ---- Parquet -> Parquet with small row groups ---------------------------------------------

def _tables_of(batches: Iterable[pa.RecordBatch], rows: int) -> Iterable[pa.Table]:
    """Regroup a stream of batches into tables of exactly `rows` rows (the last may be short)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _readable_batches(pf: pq.ParquetFile, path: str, batch_size: int) -> Iterable[pa.RecordBatch]:
    """The file's batches; a damaged part stops the rewrite in one line (rewriting keeps every
    row, so it cannot skip some: the JSONL conversion can)."""
    try:
        yield from pf.iter_batches(batch_size=batch_size)
    except (OSError, pa.ArrowException) as e:
        raise ConversionError(f"{path} is damaged ({arrow_reason(e)}): download it again, or convert it "
                              f"to JSONL, which skips the rows that cannot be read") from None


def rewrite_parquet(spec: str, output: str, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                    progress: bool = True) -> dict:
    """Rewrite Parquet file(s) into one file with small row groups: same schema, same rows in
    the same order, pictures byte for byte (dictionary-encoded: shared ones stored once)."""
    files = parquet_files(spec)
    for path in files:
        layout_of(path)  # a file we cannot read raises its one-line ValueError now
    schema = pq.read_schema(files[0])
    for path in files[1:]:
        if not pq.read_schema(path).equals(schema):
            raise ConversionError(f"{path}: its columns differ from {files[0]}'s; rewrite the "
                                  f"files one by one")
    if any(os.path.abspath(p) == os.path.abspath(output) for p in files):
        raise ConversionError(f"{output}: the output must not be one of the inputs")
    picture = next(c for c in PICTURE_COLUMNS if c in schema.names)
    options = _writer_options(schema, _picture_leaves(schema, picture))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    with atomic_output(output) as tmp, pq.ParquetWriter(tmp, schema, **options) as out, \
            tqdm(total=total, desc="rewriting", unit=" rows", disable=not progress) as bar:
        for path in files:
            with pq.ParquetFile(path, memory_map=True) as pf:
                batches = _readable_batches(pf, path, batch_size=min(row_group_size, 1024))
                for table in _tables_of(batches, row_group_size):
                    out.write_table(table.cast(schema), row_group_size=row_group_size)
                    bar.update(table.num_rows)
    return {"rows": total, "bytes": os.path.getsize(output)}


# ---- command line -------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="a JSON/JSONL file, or Parquet: a file, a folder of shards, a glob")
    parser.add_argument("--output", required=True,
                        help="a .parquet file, or a .jsonl/.json file (from Parquet input)")
    parser.add_argument("--images_dir",
                        help="the image folder: read for JSON input, written for JSON output")
    parser.add_argument("--image_prefix", default=None, help=IMAGE_PREFIX_HELP)
    parser.add_argument("--row_group_size", type=number_in(int, 1), default=DEFAULT_ROW_GROUP_SIZE,
                        help="rows per Parquet row group (default %(default)s): every random "
                             "read decodes a whole row group")
    parser.add_argument("--keep_order", action="store_true",
                        help="keep the records' order (JSON -> Parquet); only neighbouring "
                             "rows then share their stored pictures")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    args = parser.parse_args(argv)

    parquet_in = is_parquet(args.input)
    parquet_out = args.output.lower().endswith(".parquet")
    json_out = args.output.lower().endswith((".jsonl", ".json"))
    try:
        if parquet_in and parquet_out:
            result = rewrite_parquet(args.input, args.output, args.row_group_size)
        elif parquet_in and json_out:
            if not args.images_dir:
                raise ConversionError("--images_dir is needed: the folder to write pictures to")
            result = parquet_to_json(args.input, args.output, args.images_dir, args.strict)
        elif parquet_out:
            if not args.images_dir:
                raise ConversionError("--images_dir is needed: the folder the pictures are in")
            check_json_file(args.input)
            result = json_to_parquet(args.input, args.images_dir, args.output,
                                     args.image_prefix, args.row_group_size, args.keep_order,
                                     args.strict)
        else:
            raise ConversionError(f"nothing to convert {args.input} -> {args.output}: one "
                                  f"side must be .parquet, the other .parquet/.jsonl/.json")
    except OSError as e:   # ours carry a message; the system's a file name and a reason
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.output} was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
