"""What every data source hands the dataset: one raw record at a time, or the reason it is bad.

Sources (JSON/JSONL files with an image folder, Parquet files with pictures inside) differ only
in how a record is stored. They all give a `RawRecord`: the turns as the file holds them and the
pictures the turns' `<image>` marks refer to (in order). Checking the turns, tokenizing and
decoding the pictures is the dataset's job, the same for every source.
"""
from typing import List, NamedTuple, Union


class BadRecord(Exception):
    """A problem with one record; the message is the reason, "kind" or "kind: detail"."""


class RawRecord(NamedTuple):
    record_id: object                  # the record's "id" if it has one, else None
    turns: list                        # [{"from", "value"}] or [{"role", "content"}], as stored
    pictures: List[Union[str, bytes]]  # file paths or encoded picture bytes, one per <image> mark
