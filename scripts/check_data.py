"""Scan a whole dataset for bad records without training.

Runs every check the trainer would run, including the costly ones it does lazily: each record
is tokenized and each image fully decoded. Prints every problem and a summary; the exit code is
1 if any problem was found, 2 if the data could not be opened at all, else 0.

    python scripts/check_data.py --data_path dataset/sft_data.jsonl --images_dir dataset/sft_images

The limits default to the trainers' own (`--max_seq_len 640`), except `--max_images`: none
unless given (the trainers allow 1 picture per record in pretraining, 4 in SFT). A training
script's `--check_data` checks with exactly that run's flags.
"""
import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # scripts/ is a subfolder: make `dataset` and `model` importable
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from dataset.records import IMAGE_PREFIX_HELP  # noqa: E402
from dataset.vlm_dataset import DEFAULT_MAX_SEQ_LEN, Skipped, VLMDataset  # noqa: E402
from model.config import IMAGE_PLACEHOLDER_IDS, number_in  # noqa: E402
from model.prompt import DEFAULT_FRAMES, load_tokenizer  # noqa: E402


def _no_pixels(images):
    """The dataset decodes (and so checks) every image before calling this; no pixels needed."""
    return torch.zeros(len(images), 3, 1, 1)


def scan(data_path, images_dir, image_prefix=None, max_seq_len=DEFAULT_MAX_SEQ_LEN, max_images=None,
         max_turns=None, frames=DEFAULT_FRAMES, tokenizer=None, image_ids=IMAGE_PLACEHOLDER_IDS, progress=True):
    """Build the dataset (load-time checks) then fetch every item (decode + length checks).

    Returns the dataset, whose `problems` and `summary()` now cover the whole scan.
    """
    dataset = VLMDataset(data_path, images_dir, tokenizer or load_tokenizer(), image_ids,
                         max_seq_len=max_seq_len, max_turns=max_turns, image_prefix=image_prefix,
                         max_images=max_images, frames=frames, preprocess=_no_pixels)
    for i in tqdm(range(len(dataset)), desc="checking records", disable=not progress):
        item = dataset[i]
        if isinstance(item, Skipped):
            dataset.report(item.record_ref, item.reason)
    return dataset


def check_dataset(data_path, images_dir, **options):
    """All problems of a dataset as (record_ref, reason) pairs; options as for `scan`."""
    return scan(data_path, images_dir, **options).problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True,
                        help="JSON list or JSONL file, or Parquet (a file, a folder of shards or a glob)")
    parser.add_argument("--images_dir", "--images_path", default=None,
                        help="the pictures of JSON/JSONL data (Parquet holds its own)")
    parser.add_argument("--image_prefix", default=None, help=IMAGE_PREFIX_HELP)
    parser.add_argument("--max_seq_len", type=number_in(int, 1), default=DEFAULT_MAX_SEQ_LEN)
    parser.add_argument("--max_images", type=number_in(int, 1), default=None,
                        help="pictures per record, a clip's keyframes included (default: no limit; "
                             "training allows 1 in pretrain, 4 in SFT)")
    parser.add_argument("--frames", type=number_in(int, 1), default=DEFAULT_FRAMES,
                        help="keyframes of a clip whose record does not say")
    parser.add_argument("--max_turns", type=number_in(int, 1), default=None)
    args = parser.parse_args(argv)

    # Problems are logged by the dataset as they are found, one line each.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    try:
        with logging_redirect_tqdm():  # keep the progress bar intact between problem lines
            dataset = scan(args.data_path, args.images_dir, image_prefix=args.image_prefix,
                           max_seq_len=args.max_seq_len, max_images=args.max_images,
                           max_turns=args.max_turns, frames=args.frames)
    except (OSError, ValueError) as e:   # no such file, not JSON, not our Parquet layout, unreadable
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the scan was not finished", file=sys.stderr)
        return 130
    print(dataset.summary())
    return 1 if dataset.problems else 0


if __name__ == "__main__":
    sys.exit(main())
