"""Data-loading cost of MiniMind-V training: Parquet (pictures inside) against JSONL + an image
folder, on synthetic data in the official layout.

    python bench/bench_data.py [--rows 200000] [--epoch_rows 20000] [--repeats 3] [--work_dir DIR --keep]
    python bench/bench_data.py --rows 1000000 --skip_folder        # the index memory at 1M rows
    python bench/bench_data.py --rows 2000 --samples 64            # smoke (CI), < 40 s

Builds, under --work_dir (a temporary folder unless given), the same N records twice:
* `data.parquet`: the official MiniMind-V layout (`conversations`: a JSON string of
  {"role", "content"} turns, `image_bytes`: the JPEG), written the way scripts/convert_data.py
  writes it (row groups of --row_group_size rows, picture column dictionary-encoded and
  uncompressed, text zstd, rows that share a picture next to each other);
* `data.jsonl` + `images/`: one file per distinct picture (the v1 layout).
About --rows_per_picture rows share each picture (the real pretrain file: 1.27M rows, 640K
pictures) and --text_only of the rows are text-only (no `<image>` mark; the 8x8 black JPEG
stand-in in the Parquet picture column, "image": "" in the JSONL). Pictures are small JPEGs
(--picture_size px square) cut from a pool of a few thousand distinct encodings, so building is
quick; their bytes repeat only every --pool pictures, never within a row group.

Every figure is taken in a fresh subprocess of this script (`--_measure ...`), so imports and
earlier work do not pollute it:
* index: the time to construct VLMDataset (the source index; for JSONL its load-time checks
  too) and the resident memory it adds (RSS after imports, tokenizer and preprocessor = the
  baseline; then the delta after indexing, and the peak while indexing), plus the pickled
  size of the source and of the whole dataset (what every spawned DataLoader worker gets).
  The RSS delta holds more than the index arrays: Arrow's compute kernels (~35 MB, once per
  process) and whatever the allocator keeps of the indexing work, which varies by tens of MB
  from run to run. The figure at 1M rows is extrapolated from a second point (the first row
  group alone) unless the data has 1M rows: the measured figure is the one to trust
  (`--rows 1000000 --skip_folder`, ~2 min);
* throughput: samples/s of the full __getitem__ (parse, tokenize, decode the JPEG, CLIP
  preprocessing to 224x224) through a torch DataLoader (batch 16, the project's collate, the
  trainers' sampler: seeded, Parquet in row-group windows), with 0 and 2 workers, over one
  whole epoch of the first --epoch_rows rows (their own files, written like the full ones).
  A whole epoch, because that is what a Parquet reader is built for: it decodes each row
  group once per pass over a window, so the first samples of a window pay for many decodes
  and later ones for none; a few thousand samples timed from a window's start charged each
  sample ~20 times its share (0.05 decodes a sample instead of 0.002). Both sources run in
  one process and take turns over stretches of their epochs (0 workers: 8 batches; 2 workers:
  a tenth of the epoch, the loaders keeping their workers), so that the machine's
  minute-to-minute load (+-10% here) hits both alike; rounds repeat it (--repeats; median).
  The warm-up (first calls of the tokenizer, template and torch ops) runs on other dataset
  objects (the first row group's files), so it decodes nothing the timed epoch reads. For
  Parquet with 0 workers it also counts the row-group decodes (LRU misses) and their time.
Prints one JSON object on stdout; progress goes to stderr. The machine may be shared: the
1-minute load average is reported before and after.
"""
import argparse
import gc
import itertools
import io
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Only light imports at module level: the measuring subprocesses take their RSS baseline after
# the heavy ones (torch, transformers, pyarrow), which they import themselves.
import numpy as np  # noqa: E402

from machine import cpu_name  # noqa: E402  (same folder)

PARQUET, JSONL, BOTH = "parquet", "jsonl", "both"
QUESTIONS = ["请描述这张图片。", "图中有什么？", "这张图片的主要内容是什么？", "简要概括图片。",
             "图片里的人在做什么？", "请说说图中的场景。", "What is shown in this picture?",
             "Describe the image briefly."]
TEXT_ONLY_QUESTIONS = ["你好，请介绍一下你自己。", "天空为什么是蓝色的？", "写一句关于春天的诗。",
                       "What is a vision-language model?"]
# Answers are cut from one long random string of common characters (varied lengths, cheap).
ANSWER_CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工"
                "也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起"
                "小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事"
                "平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解"
                "问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及"
                "管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西"
                "被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶"
                "油思术极交受联什认六共权收证改清美再采转更单风切打白教速花带安场身车例真务具万每目"
                "至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段"
                "研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半"
                "办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲"
                "快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听"
                "该铁价严，。、；：")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ---- building the data --------------------------------------------------------------------

def picture_pool(n: int, size: int, seed: int = 0) -> list:
    """`n` distinct small JPEGs: smooth colour fields (random 4x4 colours blown up bilinearly)
    with a little noise, so they decode and compress like photographs, not like flat fills."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=85)
        pool.append(out.getvalue())
    return pool


def standin_jpeg() -> bytes:
    """The picture column of a text-only row: an 8x8 black JPEG, as in the official files."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG")
    return out.getvalue()


def plan_rows(n_rows: int, rows_per_picture: float, text_only: float, seed: int = 0) -> np.ndarray:
    """The picture number of every row (-1: text-only), rows of one picture next to each other
    (as convert_data.py sorts them, so they share a row group and its dictionary).
    Each picture gets 1..(2*rows_per_picture - 1) rows, uniformly: `rows_per_picture` on average."""
    rng = np.random.default_rng(seed)
    n_picture_rows = n_rows - int(round(n_rows * text_only))
    most = max(1, int(round(2 * rows_per_picture)) - 1)
    counts = rng.integers(1, most + 1, size=n_picture_rows)   # more than enough pictures
    ends = np.cumsum(counts)
    n_pictures = int(np.searchsorted(ends, n_picture_rows)) + 1
    picture_of_row = np.repeat(np.arange(n_pictures), counts[:n_pictures])[:n_picture_rows]
    # Text-only rows at random places among the others.
    plan = np.full(n_rows, -1, dtype=np.int64)
    plan[np.sort(rng.choice(n_rows, size=n_picture_rows, replace=False))] = picture_of_row
    return plan


def conversations_of(plan: np.ndarray, seed: int = 0) -> list:
    """One [{"role", "content"}, ...] list per row: a question (with `<image>\\n` in front for a
    picture row) and an answer of 20..160 characters."""
    rng = np.random.default_rng(seed + 1)
    text = "".join(rng.choice(list(ANSWER_CHARS), size=1 << 16))
    lengths = rng.integers(20, 161, size=len(plan))
    starts = rng.integers(0, len(text) - 160, size=len(plan))
    questions = rng.integers(0, 1 << 30, size=len(plan))
    turns = []
    for picture, q, start, length in zip(plan.tolist(), questions.tolist(), starts.tolist(),
                                         lengths.tolist()):
        if picture >= 0:
            user = "<image>\n" + QUESTIONS[q % len(QUESTIONS)]
        else:
            user = TEXT_ONLY_QUESTIONS[q % len(TEXT_ONLY_QUESTIONS)]
        turns.append([{"role": "user", "content": user},
                      {"role": "assistant", "content": text[start:start + length]}])
    return turns


def picture_name(picture: int) -> str:
    return f"{picture:08d}.jpg"


def write_parquet(path: str, plan, turns, pool, standin: bytes, row_group_size: int) -> None:
    """The official layout, written like scripts/convert_data.py writes it: the picture column
    dictionary-encoded (a picture shared by rows of one row group is stored once) with a
    dictionary page big enough for a whole row group, uncompressed (JPEG does not compress);
    the text zstd."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("conversations", pa.string()), ("image_bytes", pa.binary())])
    options = dict(use_dictionary=["image_bytes"], dictionary_pagesize_limit=1 << 30,
                   compression={"conversations": "zstd", "image_bytes": "none"},
                   write_statistics=["conversations"])
    with pq.ParquetWriter(path, schema, **options) as out:
        for start in range(0, len(plan), row_group_size):
            rows = range(start, min(start + row_group_size, len(plan)))
            text = pa.array([json.dumps(turns[r], ensure_ascii=False) for r in rows], pa.string())
            pictures = pa.array([pool[plan[r] % len(pool)] if plan[r] >= 0 else standin
                                 for r in rows], pa.binary())
            out.write_table(pa.table([text, pictures], schema=schema), row_group_size=row_group_size)


def write_jsonl(path: str, plan, turns) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for picture, conv in zip(plan.tolist(), turns):
            record = {"conversations": conv, "image": picture_name(picture) if picture >= 0 else ""}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_folder(images_dir: str, n_pictures: int, pool) -> None:
    """One file per distinct picture."""
    os.makedirs(images_dir, exist_ok=True)
    for picture in range(n_pictures):
        with open(os.path.join(images_dir, picture_name(picture)), "wb") as f:
            f.write(pool[picture % len(pool)])


def tiny_clip_processor(folder: str):
    """A CLIP preprocessor (224 px, CLIP mean/std) from a folder holding only configs: the
    preprocessing does not depend on weights, and ImagePreprocessor wants a config.json."""
    from transformers import CLIPVisionConfig

    from model.vision import ImagePreprocessor, clip_processor_class

    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        os.makedirs(folder, exist_ok=True)
        CLIPVisionConfig(image_size=224, patch_size=32).save_pretrained(folder)
        clip_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
    return ImagePreprocessor.from_pretrained(folder)


def build(args) -> dict:
    """Write the data under args.work_dir; returns what was built and how long each part took."""
    t0 = time.perf_counter()
    plan = plan_rows(args.rows, args.rows_per_picture, args.text_only)
    n_pictures = int(plan.max()) + 1 if (plan >= 0).any() else 0
    turns = conversations_of(plan)
    pool = picture_pool(min(args.pool, max(n_pictures, 1)), args.picture_size)
    prepare_s = time.perf_counter() - t0
    log(f"planned {args.rows} rows, {n_pictures} pictures ({prepare_s:.1f} s)")

    built = {"rows": args.rows, "distinct_pictures": n_pictures,
             "text_only_rows": int((plan < 0).sum()), "row_group_size": args.row_group_size,
             "row_groups": -(-args.rows // args.row_group_size),
             "picture_px": args.picture_size, "picture_pool": len(pool),
             "mean_picture_bytes": round(float(np.mean([len(p) for p in pool])), 1),
             "build_s": {"prepare": round(prepare_s, 2)}}
    timed = [("parquet", lambda: write_parquet(paths(args)["parquet"], plan, turns, pool,
                                               standin_jpeg(), args.row_group_size))]
    if not args.skip_folder:
        timed += [("jsonl", lambda: write_jsonl(paths(args)["jsonl"], plan, turns)),
                  ("folder", lambda: write_folder(paths(args)["images"], n_pictures, pool))]
    # Two subsets, written like the whole: the first row group alone ("small": indexing it
    # shows the fixed part of the index memory, what any index costs, e.g. pyarrow's compute
    # kernels, which must not be scaled with rows; and the throughput runs warm up on it), and
    # the first --epoch_rows rows ("epoch": the throughput runs time one epoch of them).
    for data, rows in (("small", args.row_group_size), ("epoch", args.epoch_rows)):
        subset = slice(0, min(rows, args.rows))
        write_parquet(paths(args, data)["parquet"], plan[subset], turns[subset], pool,
                      standin_jpeg(), args.row_group_size)
        if not args.skip_folder:
            write_jsonl(paths(args, data)["jsonl"], plan[subset], turns[subset])
        built[f"{data}_rows"] = subset.stop
    for name, step in timed:
        t = time.perf_counter()
        step()
        built["build_s"][name] = round(time.perf_counter() - t, 2)
        log(f"wrote {name} ({built['build_s'][name]} s)")
    built["bytes"] = {name: os.path.getsize(paths(args)[name]) for name in ("parquet", "jsonl")
                      if os.path.isfile(paths(args)[name])}
    return built


def paths(args, data: str = None) -> dict:
    """Where things are: `data` names the full data set ("data"), its first row group alone
    ("small": the fixed part of the index memory, and the throughput runs' warm-up) or its
    first --epoch_rows rows ("epoch": the throughput runs); default args.data."""
    data = data or getattr(args, "data", None) or "data"
    return {"parquet": os.path.join(args.work_dir, f"{data}.parquet"),
            "jsonl": os.path.join(args.work_dir, f"{data}.jsonl"),
            "images": os.path.join(args.work_dir, "images"),
            "clip": os.path.join(args.work_dir, "tiny-clip")}


# ---- measuring (in a fresh subprocess each) ------------------------------------------------

def rss_mb() -> dict:
    """Resident memory of this process, from /proc (Linux): now, peak, and the part of it that
    is anonymous (heap: this process's own) or file-backed (code and mapped files: shared with
    forked workers and reclaimable)."""
    wanted = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                found[wanted[key]] = int(value.split()[0]) / 1024
    return found


def reset_peak_rss() -> bool:
    """Restart the peak (VmHWM) count here, so the peak reported is that of the indexing."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def open_dataset(args, preprocess, tokenizer, data: str = None, source: str = None):
    from dataset.vlm_dataset import VLMDataset
    from model.config import IMAGE_PLACEHOLDER_IDS

    where = paths(args, data)
    if (source or args.source) == PARQUET:
        return VLMDataset(where["parquet"], None, tokenizer, IMAGE_PLACEHOLDER_IDS,
                          max_seq_len=args.max_seq_len, preprocess=preprocess)
    return VLMDataset(where["jsonl"], where["images"], tokenizer, IMAGE_PLACEHOLDER_IDS,
                      max_seq_len=args.max_seq_len, preprocess=preprocess)


def array_bytes(obj) -> int:
    """Bytes of the numpy arrays among an object's attributes: the index proper."""
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def measure_index(args) -> dict:
    """The index figures of args.source's args.data files, in this fresh process."""
    # Everything a training process imports and loads anyway comes before the baseline.
    import pyarrow as pa
    import torch  # noqa: F401
    import dataset.parquet  # noqa: F401
    import dataset.vlm_dataset  # noqa: F401
    from model.prompt import load_tokenizer

    tokenizer = load_tokenizer()
    preprocess = tiny_clip_processor(paths(args)["clip"])
    gc.collect()
    baseline = rss_mb()
    peak_reset = reset_peak_rss()

    t0 = time.perf_counter()
    ds = open_dataset(args, preprocess, tokenizer)
    index_s = time.perf_counter() - t0
    peak = rss_mb()["peak"]
    gc.collect()
    pa.default_memory_pool().release_unused()
    after = rss_mb()
    return {
        "index_build_s": round(index_s, 3), "rows_in_use": len(ds),
        "load_problems": len(ds.problems),
        "rss_baseline_mb": round(baseline["rss"], 1),   # after imports + tokenizer + preprocessor
        "resident_mb_after_index": round(after["rss"] - baseline["rss"], 1),
        "of_which_anon_mb": round(after["anon"] - baseline["anon"], 1),
        "of_which_file_mb": round(after["file"] - baseline["file"], 1),
        # While indexing; None if this kernel would not reset the peak count.
        "peak_mb_while_indexing": round(peak - baseline["rss"], 1) if peak_reset else None,
        "index_arrays_mb": round((array_bytes(ds) + array_bytes(ds.source)) / 2**20, 2),
        "pickled_source_kb": round(len(pickle.dumps(ds.source)) / 1024, 1),
        "pickled_dataset_kb": round(len(pickle.dumps(ds)) / 1024, 1),   # tokenizer included
    }


def count_row_group_loads(source) -> dict:
    """Count and time the row-group decodes (LRU misses) of a ParquetRecords in this process,
    by wrapping its cache's `get(key, load)`. Instrumentation only (private names, so it gives
    up quietly if they change); a forked worker starts a fresh cache and is not counted."""
    stats = {"lookups": 0, "misses": 0, "load_s": 0.0}
    cache = getattr(source, "_cache", None)
    if cache is None or not hasattr(cache, "get"):
        return {}
    original = cache.get

    def get(key, load):
        def timed_load():
            t = time.perf_counter()
            table = load()
            stats["load_s"] += time.perf_counter() - t
            stats["misses"] += 1
            return table
        stats["lookups"] += 1
        return original(key, timed_load)

    cache.get = get
    return stats


# The sources take turns over stretches of their epochs: with 0 workers 8 batches at a time;
# with workers a tenth of the epoch (each stretch refills the workers' pipeline, so not too short).
TURN_BATCHES_IN_PROCESS = 8
TURNS_WITH_WORKERS = 10


class _Stretch:
    """A batch sampler over one stretch of an epoch's batches, set before each pass; a loader
    with persistent workers takes one pass per stretch and keeps its workers (and their
    row-group caches) from one stretch to the next."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def measure_throughput(args) -> dict:
    """samples/s over one epoch of the "epoch" files (or its first --samples), per source.

    Both sources (with --source both) run in this one process and take turns, a stretch of
    their epoch at a time, each stretch timed on its own: load from elsewhere on the machine
    (it moves by +-10% from one minute to the next here) then hits both alike, and the ratio
    is what is left. With workers, each source's loader keeps its workers between stretches
    (their start-up is timed once, in the first stretch, as in an epoch of training).
    First --warmup items of each source's first-row-group files in this process (tokenizer,
    chat template, torch ops; forked workers inherit it): other dataset objects, so the
    warm-up decodes nothing the timed epoch reads.
    """
    import torch
    from torch.utils.data import DataLoader

    from dataset.vlm_dataset import make_collate
    from model.prompt import load_tokenizer
    from trainer.trainer import StepSampler

    # One intra-op thread, as in DataLoader workers (torch sets 1 there): the tensors of one
    # item are small, and on a busy 2-core machine more threads mostly wait on each other
    # (measured: 2 threads ran workers=0 four times slower than 1).
    torch.set_num_threads(args.threads)
    tokenizer, preprocess = load_tokenizer(), tiny_clip_processor(paths(args)["clip"])
    sources = [PARQUET, JSONL] if args.source == BOTH else [args.source]

    def steps(dataset, samples=None):
        # The trainers' order: seeded, and for Parquet shuffled a window of row groups at a time.
        order = StepSampler(len(dataset), args.batch_size, seed=args.seed, read_groups=dataset.read_groups())
        return list(order if samples is None else itertools.islice(order, -(-samples // args.batch_size)))

    runs = {}
    for source in sources:
        warmup = open_dataset(args, preprocess, tokenizer, data="small", source=source)
        for batch in steps(warmup, args.warmup):
            for i in batch:
                warmup[i]
        ds = open_dataset(args, preprocess, tokenizer, data="epoch", source=source)
        stretch = _Stretch()
        loader = DataLoader(ds, batch_sampler=stretch, num_workers=args.workers, collate_fn=make_collate(0),
                            persistent_workers=args.workers > 0)
        runs[source] = {"ds": ds, "loader": loader, "stretch": stretch, "batches": steps(ds, args.samples),
                        "seconds": 0.0, "samples": 0, "skipped": 0,
                        "loads": count_row_group_loads(ds.source) if args.workers == 0 else {}}
    longest = max(len(run["batches"]) for run in runs.values())
    turn = TURN_BATCHES_IN_PROCESS if args.workers == 0 else max(1, -(-longest // TURNS_WITH_WORKERS))
    for first in range(0, longest, turn):
        for run in runs.values():
            run["stretch"].batches = run["batches"][first:first + turn]
            start = time.perf_counter()
            for batch in run["loader"]:
                run["samples"] += len(batch["indices"]) + len(batch["skipped"])
                run["skipped"] += len(batch["skipped"])
            run["seconds"] += time.perf_counter() - start
    return {source: throughput_figures(run, torch.get_num_threads()) for source, run in runs.items()}


def throughput_figures(run: dict, threads: int) -> dict:
    seconds, timed, loads = run["seconds"], run["samples"], run["loads"]
    result = {"samples_per_s": round(timed / seconds, 1) if seconds else None,
              "timed_samples": timed, "skipped": run["skipped"], "torch_threads": threads}
    if loads:  # the whole timed epoch: every row-group decode it needed
        misses, lookups = loads["misses"], loads["lookups"]
        result["row_group_loads"] = {
            "lru_miss_rate": round(misses / lookups, 3) if lookups else None,
            "misses_per_sample": round(misses / timed, 4) if timed else None,
            "ms_per_miss": round(1000 * loads["load_s"] / misses, 2) if misses else None,
            "share_of_time": round(loads["load_s"] / seconds, 3) if seconds else None,
            "lru_mb_at_end": round(run["ds"].source.cached_bytes / 2**20, 1)}
    return result


def measure_in_subprocess(args, what: str, source: str, workers: int = 0, data: str = "data") -> dict:
    """Run one `--_measure` in a fresh interpreter and return its JSON."""
    command = [sys.executable, os.path.abspath(__file__), "--_measure", what, "--source", source,
               "--workers", str(workers), "--work_dir", args.work_dir,
               *(["--samples", str(args.samples)] if args.samples else []), "--warmup", str(args.warmup),
               "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
               "--seed", str(args.seed), "--threads", str(args.threads), "--data", data]
    t = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    log(f"{what} {source} ({data})" + (f" workers={workers}" if what == "throughput" else "")
        + f": {json.dumps(result)} ({time.perf_counter() - t:.1f} s, load {load_average()})")
    return result


# ---- main ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--row_group_size", type=int, default=1000)
    p.add_argument("--rows_per_picture", type=float, default=2.0)
    p.add_argument("--text_only", type=float, default=0.08, help="share of text-only rows")
    p.add_argument("--picture_size", type=int, default=64, help="side of the square JPEGs, px")
    p.add_argument("--pool", type=int, default=4096, help="distinct JPEG encodings to reuse")
    p.add_argument("--epoch_rows", type=int, default=20_000,
                   help="rows whose whole epoch each throughput run times")
    p.add_argument("--samples", type=int, default=None,
                   help="time only this many samples of the epoch (smoke runs)")
    p.add_argument("--warmup", type=int, default=256, help="items read before the clock starts")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of throughput runs (median reported): the machine may be shared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the measuring process")
    p.add_argument("--work_dir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--reuse", action="store_true", help="use the data already in --work_dir")
    p.add_argument("--skip_folder", action="store_true",
                   help="no JSONL + image folder (the 1M-row run): Parquet only")
    p.add_argument("--skip_throughput", action="store_true", help="index figures only")
    p.add_argument("--_measure", choices=["index", "throughput"], help=argparse.SUPPRESS)
    p.add_argument("--source", choices=[PARQUET, JSONL, BOTH], help=argparse.SUPPRESS)
    p.add_argument("--data", default="data", choices=["data", "small", "epoch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._measure:   # a measuring subprocess: JSON on stdout
        args.workers = args.workers[0]
        print(json.dumps(measure_index(args) if args._measure == "index" else measure_throughput(args)))
        return

    temporary = args.work_dir is None
    args.work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench_data-"))
    os.makedirs(args.work_dir, exist_ok=True)
    report = {"machine": {"cpu_count": os.cpu_count(), "cpu": cpu_name(),
                          "python": platform.python_version(),
                          "load_average_1min_start": load_average()}}
    try:
        manifest = os.path.join(args.work_dir, "built.json")
        built = {}
        if args.reuse and os.path.isfile(manifest):
            with open(manifest) as f:
                built = json.load(f)
        if "epoch_rows" in built:   # data of this version of the bench (it has the epoch files)
            report["data"] = built
            args.skip_folder = args.skip_folder or "folder" not in report["data"]["build_s"]
        else:
            report["data"] = build(args)
            with open(manifest, "w") as f:
                json.dump(report["data"], f)
        tiny_clip_processor(paths(args)["clip"])   # written once, before the subprocesses
        sources = [PARQUET] + ([] if args.skip_folder else [JSONL])

        report["index"] = {s: measure_in_subprocess(args, "index", s) for s in sources}
        if not args.skip_throughput:
            # Rounds repeat the whole cycle; samples_per_s is the median of the rounds. The
            # row-group loads are those of the first round.
            report["throughput"] = {}
            for _ in range(args.repeats):
                for w in args.workers:
                    # Both sources in one process, taking turns (measure_throughput).
                    for run in [BOTH] if len(sources) > 1 else sources:
                        for s, result in measure_in_subprocess(args, "throughput", run, w, data="epoch").items():
                            first = report["throughput"].setdefault(f"{s}_workers{w}", result)
                            first.setdefault("samples_per_s_rounds", []).append(result["samples_per_s"])
            for result in report["throughput"].values():
                result["samples_per_s"] = statistics.median(result["samples_per_s_rounds"])
            report["throughput_settings"] = {
                "batch_size": args.batch_size, "epoch_rows": report["data"]["epoch_rows"],
                "timed_samples": args.samples or "the whole epoch",
                "warmup_items": f"{args.warmup}, of the first row group's files (another dataset object)",
                "rounds": args.repeats,
                "sampler": f"the trainers' StepSampler (seed={args.seed}; Parquet: row-group windows)",
                "collate": "dataset.vlm_dataset.make_collate(0)",
                "item": "parse + tokenize + JPEG decode + CLIP preprocessing to 224x224"}
        # With enough rows, the first row group alone too: fixed vs per-row index memory.
        if report["data"]["small_rows"] * 10 <= report["data"]["rows"]:
            report["index_first_row_group_only"] = {
                s: measure_in_subprocess(args, "index", s, data="small") for s in sources}
            report["index_memory_fit"] = {s: memory_fit(report, s) for s in sources}
        report["targets"] = targets(report)
    finally:
        report["machine"]["load_average_1min_end"] = load_average()
        if temporary and not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)
        else:
            report["work_dir"] = args.work_dir
    print(json.dumps(report, indent=2))


def memory_fit(report: dict, source: str) -> dict:
    """The index memory as fixed + per row, from two points: the full data and its first row
    group alone; and what that gives at 1M rows. A straight line, because the index is arrays
    of one entry per row (plus whatever the allocator keeps of the work of building them)."""
    rows, small_rows = report["data"]["rows"], report["data"]["small_rows"]
    full = report["index"][source]["resident_mb_after_index"]
    fixed = report["index_first_row_group_only"][source]["resident_mb_after_index"]
    per_row = (full - fixed) / (rows - small_rows)
    return {"fixed_mb": fixed, "kb_per_1000_rows": round(per_row * 1000 * 1024, 2),
            "mb_at_1M_rows": round(fixed + per_row * (1_000_000 - small_rows), 1)}


def targets(report: dict) -> dict:
    """The issue's targets against the figures measured; the memory at 1M rows is measured if
    the data had 1M rows, else extrapolated by memory_fit (`how` says which)."""
    rows = report["data"]["rows"]
    out = {}
    memory = {"target": "resident MB after indexing <= 300 at 1M rows"}
    for source, figures in report["index"].items():
        if rows >= 1_000_000:
            mb, how = figures["resident_mb_after_index"], f"measured at {rows} rows"
        elif source in report.get("index_memory_fit", {}):
            mb = report["index_memory_fit"][source]["mb_at_1M_rows"]
            how = f"fixed + per-row fit from {report['data']['small_rows']} and {rows} rows"
        else:
            memory[source] = {"mb_at_1M_rows": None, "met": None,
                              "how": "not extrapolated: needs >= 10 row groups of data"}
            continue
        memory[source] = {"mb_at_1M_rows": mb, "how": how, "met": mb <= 300}
    out["index_memory"] = memory
    throughput = report.get("throughput", {})
    comparisons = {"target": "Parquet samples/s >= JSONL + folder"}
    for key, result in throughput.items():
        folder = throughput.get(key.replace(PARQUET, JSONL, 1)) if key.startswith(PARQUET) else None
        if folder:
            comparisons[key.split("_", 1)[1]] = {
                "parquet_over_folder": round(result["samples_per_s"] / folder["samples_per_s"], 3),
                "met": result["samples_per_s"] >= folder["samples_per_s"]}
    if len(comparisons) > 1:
        out["throughput"] = comparisons
    return out


if __name__ == "__main__":
    main()
