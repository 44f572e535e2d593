"""Issue #11: no code runs from a file a user is handed, no work lost to a bad setting, no
traceback for a user's mistake.

Checked from the outside wherever it can be (script exit codes and stderr, files on disk), so
each test says what a user sees, whatever the code behind it looks like.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

from conftest import (CLI, EVAL, ROOT, common, eval_picture, history, load_cli, losses, make_data, run_cli,
                      run_stage, save_tiny_checkpoint)
from trainer.trainer import main

PRETRAIN = os.path.join(ROOT, "1-pretrain_vlm.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# ------------------------------------------------------------------------------ helpers
class Touch:
    """Pickles into "call pathlib.Path.touch(marker)": code that runs the moment an unsafe
    loader (pickle, torch.load(weights_only=False)) reads the file."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error_line(stderr, *needles):
    """stderr ends with exactly one `error: ...` line holding every needle, and shows no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and error_lines(stderr) == [lines[-1]], stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def usage_error(capsys, parse, argv, flag):
    """`parse(argv)` stops as argparse does on a bad value (exit code 2), in one line naming `flag`,
    which it returns."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "error:" in line]   # argparse: "PROG: error: ..."
    assert len(said) == 1 and f"argument {flag}" in said[0], err
    return said[0]


def script(out, data, clip, *extra):
    """The command line of a pretraining run from scratch."""
    return [sys.executable, PRETRAIN, *common(data, clip, out, "--from_scratch", *extra)]


def run_script(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"})


def exit_message(excinfo):
    """The text main() exits with (what the user reads on stderr)."""
    return str(excinfo.value.code)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """3-eval_chat.py's main(argv) (returns the exit code) and parse_args, plus a tiny checkpoint
    to talk to."""
    cli = load_cli()
    weights = save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "64_vlm_sft.pth")
    return types.SimpleNamespace(main=cli.main, parse_args=cli.parse_args, weights=weights)


def chat_args(chat, clip, *extra, weights=None):
    return ["--weight", weights or chat.weights, "--vision_model", clip, "--json", "--temperature", "0",
            "--max_new_tokens", "6", *extra]


def answers(stdout):
    return [json.loads(line)["answer"] for line in stdout.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------ 1. files that run code
def test_resume_file_with_code_is_refused_and_never_run(tmp_path, data, tiny_clip_dir):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"format": 2, "step": 1, "epoch": 0, "steps_in_epoch": 1, "history": [], "wandb_id": None,
                "model": {}, "optimizer": Touch(marker)}, out / "64_vlm_pretrain.pth.resume")
    proc = run_script(script(out, data, tiny_clip_dir, "--resume", "--max_steps", "1"))
    assert not marker.exists(), "loading the resume file ran the code inside it"
    assert proc.returncode != 0
    assert_one_error_line(proc.stderr, "refus", "64_vlm_pretrain.pth.resume")


def test_weights_with_code_are_refused_and_never_run(tmp_path, data, tiny_clip_dir, chat, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "64_vlm_sft.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "norm.weight": Touch(marker)}, evil)
    # A published-v1-style folder (config.json + pytorch_model.bin) is read the same safe way.
    folder = tmp_path / "minimind-v-v1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 16}))
    shutil.copy(evil, folder / "pytorch_model.bin")

    for weights in (str(evil), str(folder)):
        assert chat.main(chat_args(chat, tiny_clip_dir, "--image", os.path.join(EVAL, eval_picture()),
                                   weights=weights)) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert not marker.exists()
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, tmp_path / "out", "--init_weight", str(evil)))
    assert exit_message(exit_info).startswith("error:") and str(evil) in exit_message(exit_info)
    assert "\n" not in exit_message(exit_info)
    assert not marker.exists()


LFS_POINTER_FILE = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 605247071\n"


def damaged_torch_files(folder, good):
    """(a file that is not a usable torch.save file, what the one-line error says about it)."""
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "picture.pth", format="PNG")
    files = {"empty.pth": b"", "text.pth": b"hello\n", "cut.pth": pathlib.Path(good).read_bytes()[:1000],
             "lfs.pth": LFS_POINTER_FILE}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [(folder / "empty.pth", "the file is empty"), (folder / "text.pth", "not a file written by torch.save"),
            (folder / "lfs.pth", "a Git LFS pointer, not the weights"),
            (folder / "picture.pth", "not a file written by torch.save"),
            (folder / "cut.pth", "truncated or corrupt (PytorchStreamReader failed reading zip archive")]


def test_damaged_weights_and_resume_files_are_one_line(tmp_path, data, tiny_clip_dir, chat, capsys):
    """torch.load's own messages run to many lines (and, for a file it refuses, suggest turning
    the protection off); an empty file made it raise an exception without a message."""
    out = tmp_path / "out"
    out.mkdir()
    for damaged, says in damaged_torch_files(tmp_path / "damaged", chat.weights):
        assert chat.main(chat_args(chat, tiny_clip_dir, weights=str(damaged))) == 1
        assert_one_error_line(capsys.readouterr().err, f"cannot read checkpoint {damaged}: {says}")
        shutil.copy(damaged, out / "64_vlm_pretrain.pth.resume")
        with pytest.raises(SystemExit) as exit_info:
            main("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--resume"))
        resume = out / "64_vlm_pretrain.pth.resume"
        message = exit_message(exit_info)
        assert message.startswith(f"error: cannot read resume file {resume}: {says}"), message
        assert message.endswith("; delete it to start fresh") and "\n" not in message, message


def broken_clip_folders(folder, good):
    """(a CLIP folder with something wrong, what the one-line error says about it)."""
    def variant(name, leave_out=(), config=None, weights=None):
        path = folder / name
        path.mkdir(parents=True)
        for item in os.listdir(good):
            if item not in leave_out:
                shutil.copy(os.path.join(good, item), path / item)
        if config:
            (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **config}))
        if weights is not None:
            (path / "model.safetensors").write_bytes(weights)
        return path

    assert sorted(os.listdir(good)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    return [(variant("no_weights", ["model.safetensors"]), "is incomplete (model.safetensors or pytorch_model.bin missing)"),
            (variant("no_processor", ["preprocessor_config.json"]), "is incomplete (preprocessor_config.json missing)"),
            (variant("lfs", weights=LFS_POINTER_FILE), "model.safetensors is a Git LFS pointer, not the weights"),
            (variant("siglip", config={"model_type": "siglip_vision_model"}), "holds a 'siglip_vision_model' model, not CLIP")]


def test_a_broken_vision_model_folder_is_one_line(tmp_path, data, tiny_clip_dir, chat, capsys):
    """A download cut short or cloned without git-lfs, or another encoder: transformers' own
    errors for these are tracebacks or several lines; here one line says what is wrong."""
    for folder, says in broken_clip_folders(tmp_path / "clips", tiny_clip_dir):
        assert chat.main(chat_args(chat, str(folder))) == 1
        assert_one_error_line(capsys.readouterr().err, says)
        with pytest.raises(SystemExit) as exit_info:
            main("sft", common(data, str(folder), tmp_path / "out", "--from_scratch"))
        message = exit_message(exit_info)
        assert message.startswith("error:") and says in message and "\n" not in message, message


# ------------------------------------------------------------------------------ 2. picture paths
def test_picture_paths_outside_the_images_folder_are_bad_records(tmp_path, tiny_clip_dir, caplog):
    folder = tmp_path / "d"
    path, imgs = make_data(folder, n=8)
    # Real pictures at both places, so a loader that follows the paths would happily read them.
    shutil.copy(os.path.join(imgs, "0.png"), tmp_path / "x.png")
    shutil.copy(os.path.join(imgs, "1.png"), tmp_path / "elsewhere.png")
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    records[2]["image"] = "../../x.png"
    records[5]["image"] = str(tmp_path / "elsewhere.png")
    pathlib.Path(path).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")

    from dataset.vlm_dataset import VLMDataset
    from model.config import IMAGE_PLACEHOLDER_IDS
    from model.prompt import load_tokenizer

    with caplog.at_level("WARNING"):
        ds = VLMDataset(path, imgs, load_tokenizer(), IMAGE_PLACEHOLDER_IDS,
                        preprocess=lambda images: torch.zeros(len(images), 3, 224, 224))
    assert len(ds) == 6
    assert sorted(reason for _, reason in ds.problems) == [
        "image path outside the images folder: '../../x.png'",
        f"image path outside the images folder: {str(tmp_path / 'elsewhere.png')!r}"]
    assert re.search(r"\b2\s+image path outside the images folder", ds.summary()), ds.summary()
    assert caplog.text.count("outside the images folder") == 2

    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common((path, imgs), tiny_clip_dir, tmp_path / "out", "--from_scratch", "--strict"))
    message = exit_message(exit_info)
    assert message.startswith("error:") and "\n" not in message
    assert "line 3" in message and "outside the images folder" in message


# ------------------------------------------------------------------------------ 3. output folder
def test_unwritable_output_stops_before_training(tmp_path, data, tiny_clip_dir, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")   # a folder under a file cannot be made, not even by root
    places = [("--out_dir", blocker / "out"), ("--save_weight", blocker / "w.pth")]
    if os.geteuid() != 0:                # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        places.append(("--out_dir", locked))
    for flag, place in places:
        argv = common(data, tiny_clip_dir, tmp_path / "out", "--from_scratch", "--max_steps", "2")
        if flag == "--out_dir":
            argv[argv.index("--out_dir") + 1] = str(place)
        else:
            argv += [flag, str(place)]
        caplog.clear()
        with caplog.at_level("INFO"), pytest.raises(SystemExit) as exit_info:
            main("pretrain", argv)
        message = exit_message(exit_info)
        assert message.startswith("error: cannot write to ") and "\n" not in message, message
        assert str(place.parent if flag == "--save_weight" else place) in message
        assert "step 1" not in caplog.text and "parameters" not in caplog.text   # nothing was built or trained


# ------------------------------------------------------------------------------ 4. disk full
def full_disk(monkeypatch, fail_now=lambda: True):
    """Make the temp files that saves write to lead to /dev/full (a real ENOSPC from the kernel)
    whenever fail_now() is true."""
    import model.checkpoint as checkpoint

    real = checkpoint._temp_path

    def temp_path(path):
        tmp = real(path)
        if fail_now():
            os.symlink("/dev/full", tmp)
        return tmp

    monkeypatch.setattr(checkpoint, "_temp_path", temp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from model.checkpoint import CheckpointError, atomic_save

    path = tmp_path / "64_vlm_sft.pth"
    atomic_save({"w": torch.ones(3)}, str(path))
    before = path.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        atomic_save({"w": torch.zeros(300_000)}, str(path))
    message = str(error.value)
    assert message.startswith("no space left on the device") and "\n" not in message
    assert str(path) in message and "intact" in message
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]   # no temp file left behind


def test_no_room_for_the_feature_cache_is_one_line_at_once(tmp_path, data, tiny_clip_dir, monkeypatch):
    """The shard is a memory map: writing into it on a full disk killed the process with SIGBUS,
    part way through the encoding. Its space is now reserved first."""
    import errno

    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, tmp_path / "out", "--from_scratch", "--cache_features",
                                "--cache_dir", str(cache)))
    message = exit_message(exit_info)
    assert message.startswith(f"error: no space for the CLIP feature cache in {cache}") and "\n" not in message
    assert re.search(r"8 new picture\(s\) need [\d.]+ MB, [\d,.]+ MB is free", message), message
    assert not list(cache.rglob("shard-*"))   # the sparse file is not left behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_under_torchrun_stops_every_rank_in_one_line(tmp_path, data, tiny_clip_dir):
    """Rank 0's save failed alone; rank 1, waiting for it, showed gloo's traceback."""
    driver = tmp_path / "pretrain_on_a_full_disk.py"
    driver.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import model.checkpoint as checkpoint
real = checkpoint._temp_path
def temp_path(path):   # the first save goes through; then the disk is full
    tmp = real(path)
    if os.path.exists(path):
        os.symlink("/dev/full", tmp)
    return tmp
checkpoint._temp_path = temp_path
from trainer.trainer import main
main("pretrain")
""")
    out = tmp_path / "out"
    proc = run_script(TORCHRUN + [str(driver)] + common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "3",
                                                         "--save_interval", "1"))
    assert proc.returncode != 0
    said = sorted(line for line in proc.stderr.splitlines() if "error: " in line)
    assert len(said) == 2 and said[0] == "[rank 1] " + said[1], proc.stderr[-3000:]
    assert said[1].startswith("error: no space left on the device") and "intact" in said[1]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_during_training_is_one_line(tmp_path, data, tiny_clip_dir, monkeypatch):
    out = tmp_path / "out"
    weights = out / "64_vlm_pretrain.pth"
    saved = {}

    def after_step_1():   # step 1 saved the weights, then the resume state: the disk fills up
        if not (out / "64_vlm_pretrain.pth.resume").exists():
            return False
        saved.setdefault("step 1", weights.read_bytes())
        return True

    full_disk(monkeypatch, after_step_1)
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "4",
                                "--save_interval", "1"))
    message = exit_message(exit_info)
    assert message.startswith("error: no space left on the device") and "\n" not in message, message
    assert str(weights) in message and "intact" in message
    assert weights.read_bytes() == saved["step 1"]
    assert sorted(os.listdir(out)) == ["64_vlm_pretrain.pth", "64_vlm_pretrain.pth.resume"]


# ------------------------------------------------------------------------------ 4b. Ctrl-C
def test_ctrl_c_says_what_was_kept_and_resume_goes_on(tmp_path, data, tiny_clip_dir, monkeypatch, capsys):
    import trainer.trainer as trainer

    real_step = trainer.optimizer_step

    def ctrl_c_at(step):
        calls = []

        def optimizer_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)
        return optimizer_step

    out = tmp_path / "out"
    weights = out / "64_vlm_pretrain.pth"
    # 8 records, batch 4: 2 steps an epoch, saved at every epoch's end and every 3 steps
    argv = common(data, tiny_clip_dir, out, "--from_scratch", "--epochs", "8", "--save_interval", "3")
    for step, says in ((2, "interrupted at step 1 of 16, before the first save (every 3 steps, --save_interval): "
                           "no weights were written"),
                       (4, f"interrupted at step 3 of 16; {weights} and its resume file hold step 3: "
                           f"run the same command with --resume to go on from there")):
        monkeypatch.setattr(trainer, "optimizer_step", ctrl_c_at(step))
        with pytest.raises(SystemExit) as exit_info:
            main("pretrain", argv)
        assert exit_info.value.code == 130   # as a shell reports a run stopped by Ctrl-C
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == says
        assert weights.exists() == (step == 4)
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", argv + ["--resume"])
    assert exit_info.value.code == 0   # it went on from step 3, and logged each step once:
    assert [h["step"] for h in history(weights) if "loss" in h] == list(range(1, 17))


def test_ctrl_c_while_saving_finishes_the_pair(tmp_path, data, tiny_clip_dir, monkeypatch, capsys):
    """Ctrl-C between writing the weights and the resume file left them one save apart."""
    import signal

    import trainer.trainer as trainer

    real_save, saves = trainer.atomic_save, []

    def atomic_save(obj, path):
        saves.append(path)
        if len(saves) == 3:   # step 2's weights, after step 1's pair: Ctrl-C arrives now
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(trainer, "atomic_save", atomic_save)
    out = tmp_path / "out"
    weights = out / "64_vlm_pretrain.pth"
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "4",
                                "--save_interval", "1"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"interrupted at step 2 of 4; {weights} and its resume file hold step 2:")
    assert len(saves) == 4   # the resume file was written too, and nothing after it
    resume = torch.load(out / "64_vlm_pretrain.pth.resume", weights_only=True)
    assert resume["step"] == 2
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(saved[k], resume["model"][k]) for k in saved)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_torchrun_each_rank_says_why_in_a_line_of_its_own(tmp_path, tiny_clip_dir):
    """Every rank's "error: ..." came out at once, run together on one line."""
    missing = str(tmp_path / "absent.jsonl")
    proc = run_script(TORCHRUN + script(tmp_path / "out", (missing, str(tmp_path)), tiny_clip_dir)[1:])
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "error: " in line and "absent.jsonl" in line]
    assert sorted(said) == [f"[rank 1] error: data file {missing} not found (see README: Using the real weights and data)",
                            f"error: data file {missing} not found (see README: Using the real weights and data)"], said


def test_strict_under_torchrun_stops_every_rank_at_the_bad_record(tmp_path, tiny_clip_dir):
    """The rank that read a broken picture stopped alone; the other showed gloo's "Connection
    closed by peer" traceback at its next collective."""
    data, images = make_data(tmp_path / "data", n=8)
    (pathlib.Path(images) / "5.png").write_bytes(b"not a picture")
    proc = run_script(TORCHRUN + script(tmp_path / "out", (data, images), tiny_clip_dir, "--strict")[1:])
    assert proc.returncode != 0
    said = sorted(line for line in proc.stderr.splitlines() if "error: " in line)
    assert len(said) == 2 and said[0] == "[rank 1] " + said[1], proc.stderr[-3000:]
    assert "5.png" in said[1] and "not a readable picture" in said[1]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_under_torchrun_is_said_once(tmp_path, data, tiny_clip_dir):
    """A terminal's Ctrl-C goes to torchrun and every rank: one line says what was kept, not one per rank."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(TORCHRUN + script(out, data, tiny_clip_dir, "--epochs", "500", "--save_interval", "2")[1:],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "64_vlm_pretrain.pth.resume").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in the terminal does: the whole process group
    _, stderr = proc.communicate(timeout=120)
    said = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(said) == 1 and "and its resume file hold step" in said[0], stderr[-3000:]
    assert "[rank 1]" not in stderr


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, data, tiny_clip_dir, caplog):
    out = tmp_path / "out"
    argv = common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "2", "--resume")
    run_stage("pretrain", argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_stage("pretrain", argv) == 0
    assert f"{out / '64_vlm_pretrain.pth.resume'} holds step 2 of 2: nothing left to train" in caplog.text
    assert "saved" not in caplog.text   # it said "saved ..." having saved nothing
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_wandb_that_cannot_start_is_one_line(tmp_path, data, tiny_clip_dir, monkeypatch):
    """Not logged in (or no network): wandb's traceback, and under torchrun the other ranks'."""
    import wandb

    def not_logged_in(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, tmp_path / "out", "--from_scratch", "--use_wandb"))
    message = exit_message(exit_info)
    assert message.startswith("error: --use_wandb: wandb could not start (No API key configured.") and \
        "WANDB_MODE=offline" in message and "\n" not in message, message
    assert not (tmp_path / "out" / "64_vlm_pretrain.pth").exists()


def test_resuming_with_other_data_or_another_seed_is_one_line(tmp_path, data, tiny_clip_dir):
    """The steps left depend on both: with 4 records instead of 8 the run counted as finished and
    ended at once, saving what it had loaded."""
    out = tmp_path / "out"
    run_stage("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "3"))
    fewer = make_data(tmp_path / "fewer", n=4)
    resume_file = out / "64_vlm_pretrain.pth.resume"
    for other, says in (((fewer, "--seed", "42"), "by a run over 8 usable samples; this run has 4"),
                        ((data, "--seed", "7"), "was written with --seed 42, which orders the data; "
                                                "resume with --seed 42")):
        with pytest.raises(SystemExit) as exit_info:
            main("pretrain", common(other[0], tiny_clip_dir, out, "--from_scratch", "--resume", *other[1:]))
        message = exit_message(exit_info)
        assert message.startswith(f"error: {resume_file} ") and says in message and "\n" not in message, message


def test_ctrl_c_in_the_data_scripts_is_one_line(tmp_path, data, monkeypatch, capsys):
    from scripts import check_data, convert_data

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(check_data, "scan", ctrl_c)
    monkeypatch.setattr(convert_data, "json_to_parquet", ctrl_c)
    out = tmp_path / "data.parquet"
    assert check_data.main(["--data_path", data[0], "--images_path", data[1]]) == 130
    assert convert_data.main(["--input", data[0], "--images_dir", data[1], "--output", str(out)]) == 130
    assert capsys.readouterr().err.split() == (["interrupted:", "the", "scan", "was", "not", "finished"]
                                               + ["interrupted:", str(out), "was", "not", "written"])


# ------------------------------------------------------------------------------ 5. stale temp files
def test_temp_files_of_a_killed_save_are_removed(tmp_path, data, tiny_clip_dir):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".64_vlm_pretrain.pth.tmp-k1ll3d", out / ".64_vlm_pretrain.pth.resume.tmp-0xdead"]
    keep = [out / ".other.tmp-x", out / ".64_vlm_sft.pth.tmp-abc", out / "notes.txt"]
    for f in stale + keep:
        f.write_bytes(b"half a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "1"))
    assert exit_info.value.code == 0
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in keep)
    assert (out / "64_vlm_pretrain.pth").exists()


# ------------------------------------------------------------------------------ 6. other models' weights
def test_weights_of_another_model_are_one_line(tmp_path, tiny_clip_dir, chat, capsys):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, other)
    proc = run_cli(*chat_args(chat, tiny_clip_dir, "--image", os.path.join(EVAL, eval_picture()),
                              weights=str(other)))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: not a MiniMind-V checkpoint") and "tok_embeddings.weight" in proc.stderr
    assert "conv1.weight" in proc.stderr   # says what the file holds instead

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    assert chat.main(chat_args(chat, tiny_clip_dir, "--image", os.path.join(EVAL, eval_picture()),
                               weights=str(empty))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: not a MiniMind-V checkpoint"), err
    assert "tok_embeddings.weight" in err and "no keys" in err


# ------------------------------------------------------------------------------ 7. typed <image>
def test_typed_image_marks_are_plain_text(tiny_clip_dir, chat, tokenizer, capsys):
    from model import inference as inf
    from model.prompt import count_placeholders

    picture = os.path.join(EVAL, eval_picture())
    assert chat.main(chat_args(chat, tiny_clip_dir, "--image", picture, "--prompt", "<image> <image> 这是什么")) == 0
    out = capsys.readouterr()
    assert len(answers(out.out)) == 1 and "error" not in out.err

    image_ids = inf.VLMConfig().image_ids
    assert count_placeholders(inf.build_prompt_ids(tokenizer, "<image> <image> 这是什么", 1), image_ids) == 1
    assert count_placeholders(inf.build_prompt_ids(tokenizer, "<image> 这是什么", 0), image_ids) == 0
    model = inf.load_model(chat.weights, tiny_clip_dir)
    text = inf.answer(model, tokenizer, [], "<image> 这是什么", sampling=inf.Sampling(temperature=0, max_new_tokens=6))
    assert isinstance(text, str)


# ------------------------------------------------------------------------------ 8. --strict with workers
def test_strict_with_workers_stops_in_one_line(tmp_path, tiny_clip_dir):
    folder = tmp_path / "d"
    path, imgs = make_data(folder, n=8)
    (folder / "imgs" / "5.png").write_bytes(b"this is not a png file")
    proc = run_script(script(tmp_path / "out", (path, imgs), tiny_clip_dir, "--strict", "--epochs", "1")
                      + ["--num_workers", "2"])
    assert proc.returncode != 0
    assert_one_error_line(proc.stderr, "line 6", "5.png")
    assert not (tmp_path / "out" / "64_vlm_pretrain.pth").exists()


# ------------------------------------------------------------------------------ 9. sampling settings
@pytest.mark.parametrize("flag,value", [("--max_new_tokens", "-1"), ("--max_new_tokens", "0"),
                                        ("--temperature", "-0.5"), ("--temperature", "nan"),
                                        ("--top_p", "0"), ("--top_p", "1.5"), ("--top_k", "-1"),
                                        ("--repetition_penalty", "0")])
def test_bad_sampling_flags_are_usage_errors(chat, capsys, flag, value):
    usage_error(capsys, chat.parse_args, [flag, value], flag)


def test_generate_rejects_bad_sampling_settings(tiny_clip_dir, chat):
    from model import inference as inf

    model = inf.load_model(chat.weights, tiny_clip_dir)
    ids = torch.tensor([[1, 320, 275, 201, 3456, 2, 201, 1, 1078, 538, 201]])
    for setting, value in [("max_new_tokens", -1), ("temperature", -0.5), ("top_p", 0.0), ("top_k", -1),
                           ("repetition_penalty", 0.0), ("temperature", float("nan"))]:
        with pytest.raises(ValueError, match=setting):
            model.generate(ids, **{setting: value})
    assert model.generate(ids, max_new_tokens=2, temperature=0.0).shape == (1, 2)


def test_more_new_tokens_than_the_model_reads_names_the_setting(tiny_clip_dir, chat, capsys):
    picture = os.path.join(EVAL, eval_picture())
    args = chat_args(chat, tiny_clip_dir, "--image", picture)
    args[args.index("--max_new_tokens") + 1] = "100000"
    assert chat.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: max_new_tokens=100000"), err


@pytest.mark.parametrize("flag,value", [
    ("--batch_size", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--max_steps", "0"),
    ("--accumulation_steps", "0"), ("--log_interval", "0"), ("--save_interval", "0"), ("--val_interval", "0"),
    ("--learning_rate", "-1e-4"), ("--learning_rate", "nan"), ("--weight_decay", "-0.1"), ("--grad_clip", "0"),
    ("--warmup_steps", "-1"), ("--num_workers", "-1"), ("--max_seq_len", "0"), ("--max_images", "0"),
    ("--max_turns", "0"), ("--frames", "0"), ("--n_layers", "0"), ("--batch_size", "four")])
def test_bad_training_flags_are_usage_errors(capsys, flag, value):
    from trainer.trainer import build_parser

    usage_error(capsys, build_parser("sft").parse_args, [flag, value], flag)


def test_every_command_line_bounds_its_numbers(capsys, tmp_path):
    """The other command lines stop at parsing too, before any work (nothing is written)."""
    import demo
    from demo_shapes.__main__ import main as demo_shapes_main
    from scripts.check_data import main as check_data_main
    from scripts.convert_data import main as convert_data_main

    out = str(tmp_path / "out")
    usage_error(capsys, demo.main, ["--batch_size", "0", "--out_dir", out, "--data_dir", out], "--batch_size")
    usage_error(capsys, demo_shapes_main, ["--clip_layers", "0", "--out_dir", out], "--clip_layers")
    usage_error(capsys, demo_shapes_main, ["--n_sft", "-5", "--out_dir", out], "--n_sft")
    usage_error(capsys, check_data_main, ["--data_path", "x.jsonl", "--max_seq_len", "0"], "--max_seq_len")
    usage_error(capsys, convert_data_main, ["--input", "x.jsonl", "--output", out + ".parquet",
                                            "--row_group_size", "0"], "--row_group_size")
    assert not os.path.exists(out)


@pytest.mark.parametrize("device,says", [
    ("gpu", "is not a device (cpu, cuda, cuda:N or mps)"), ("xla", "only cpu, cuda and mps devices are supported"),
    ("cuda:99", "'cuda:99': "), ("mps", "'mps': Apple's MPS is not available here")])
def test_a_device_this_machine_lacks_is_a_usage_error(capsys, chat, tmp_path, device, says):
    """At parsing, in every command line with --device (a CPU-only torch asked for cuda raised an
    AssertionError in training)."""
    import demo
    from trainer.trainer import build_parser

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_generate
        import bench_train
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    out = str(tmp_path / "out")
    for parse in (build_parser("pretrain").parse_args, chat.parse_args, bench_train.parse_args,
                  bench_generate.parse_args, lambda argv: demo.main(argv + ["--out_dir", out, "--data_dir", out])):
        assert says in usage_error(capsys, parse, ["--device", device], "--device")
    assert not os.path.exists(out)


def test_a_run_with_nothing_usable_stops_and_keeps_the_last_weights(tmp_path, data, tiny_clip_dir):
    """Every record too long for --max_seq_len: skipped one by one, as bad records are, but a run
    that finds not one usable record stops in one line instead of saving untrained weights."""
    out = tmp_path / "out"
    run_stage("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "1"))
    weights = out / "64_vlm_pretrain.pth"
    trained = weights.read_bytes()
    for extra in (["--epochs", "3"], ["--max_steps", "1"]):   # stops at the first epoch's end; at the last step
        with pytest.raises(SystemExit) as exit_info:
            main("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_seq_len", "10", *extra))
        message = exit_message(exit_info)
        assert message.startswith("error: none of the ") and "\n" not in message, message
        assert "longer than max_seq_len=10" in message and "nothing saved" in message, message
        assert weights.read_bytes() == trained


def wrong_data_files(folder, jsonl):
    """(a file or folder a user might pass as --data_path by mistake, what the error must say)."""
    import gzip
    import zipfile

    folder.mkdir()
    with zipfile.ZipFile(folder / "data.zip", "w") as z:
        z.write(jsonl, "data.jsonl")
    (folder / "data.jsonl.gz").write_bytes(gzip.compress(pathlib.Path(jsonl).read_bytes()))
    (folder / "broken.json").write_text('[{"image": "a.jpg", ')
    (folder / "utf16.jsonl").write_text(pathlib.Path(jsonl).read_text(), encoding="utf-16")
    (folder / "pictures").mkdir()
    for name in ("cat.png", "cat.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    return [(folder / "data.zip", "is a zip archive"), (folder / "data.jsonl.gz", "is gzip-compressed"),
            (folder / "cat.png", "is a PNG picture"), (folder / "cat.jpg", "is a JPEG picture"),
            (folder / "broken.json", "not a valid JSON list"),
            (folder / "utf16.jsonl", "holds NUL bytes"), (folder / "pictures", "is a folder with no .parquet files")]


def test_the_wrong_file_as_data_is_one_line(tmp_path, data, tiny_clip_dir, capsys):
    """Not one 'malformed JSON' line per line of a zip archive, and no traceback for a folder."""
    from scripts.check_data import main as check_main

    for path, says in wrong_data_files(tmp_path / "wrong", data[0]):
        with pytest.raises(SystemExit) as exit_info:
            main("sft", common((str(path), data[1]), tiny_clip_dir, tmp_path / "out", "--from_scratch"))
        message = exit_message(exit_info)
        assert message.startswith(f"error: {path}") and says in message and "\n" not in message, message
        assert check_main(["--data_path", str(path), "--images_path", data[1]]) == 2
        assert_one_error_line(capsys.readouterr().err, str(path), says)


def test_a_file_the_run_may_not_read_is_one_line(tmp_path, data, tiny_clip_dir, monkeypatch):
    import dataset.records as records

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(records, "read_json_lines", denied)
    with pytest.raises(SystemExit) as exit_info:
        main("sft", common(data, tiny_clip_dir, tmp_path / "out", "--from_scratch"))
    assert exit_message(exit_info) == f"error: {data[0]}: Permission denied"


# ------------------------------------------------------------------------------ 10. interactive chat
def test_interactive_chat_survives_bad_questions(tiny_clip_dir, chat):
    from model import inference as inf

    longest = inf.load_model(chat.weights, tiny_clip_dir).config.max_seq_len   # "长" is one token
    questions = ["长" * (longest + 10), "你好".encode("gbk"), "这是什么颜色？"]   # too long, not UTF-8, fine
    stdin = b"\n".join(q if isinstance(q, bytes) else q.encode() for q in questions) + b"\n"
    proc = subprocess.run([sys.executable, CLI, *chat_args(chat, tiny_clip_dir, "--interactive", "--image",
                                                           os.path.join(EVAL, eval_picture()))],
                          input=stdin, capture_output=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})   # strict decoding
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    said = error_lines(err)
    assert len(said) == 2 and "too long" in said[0] and "not UTF-8" in said[1], err
    assert [json.loads(line)["prompt"] for line in out.splitlines() if line.startswith("{")] == ["这是什么颜色？"]


# ------------------------------------------------------------------------------ 11. version floors
@pytest.mark.parametrize("package,old,pretend", [
    ("torch", "2.4.1", "import torch; torch.__version__ = '2.4.1+cu121'"),
    ("transformers", "4.33.3", "import transformers; transformers.__version__ = '4.33.3'"),
    ("Python", "3.9", "import sys; sys.version_info = (3, 9, 18, 'final', 0)")])
def test_too_old_a_library_is_one_line_at_import(package, old, pretend):
    proc = subprocess.run([sys.executable, "-c", f"{pretend}; import model"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"needs {package} >= " in lines[0] and f"found {old}" in lines[0], proc.stderr


# ------------------------------------------------------------------------------ 12, 13. several processes
@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """34 good lines, 2 bad at load (malformed JSON, a missing picture), and 3 corrupt pictures:
    the 2 samples of the ragged tail that 2 x batch 4 leaves out of epoch 1, and one that trains."""
    from trainer.trainer import StepSampler

    folder = tmp_path_factory.mktemp("ragged")
    path, imgs = make_data(folder, n=34)
    tail = StepSampler(34, 4, rank=0, world=2, seed=42).left_out(0)
    trained = next(i for i in range(34) if i not in tail)
    corrupt = sorted(tail + [trained])
    assert len(tail) == 2
    for i in corrupt:
        (folder / "imgs" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a picture")
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n{"id": 34, "image": "0.png", "conversations": [\n')
        f.write(json.dumps({"id": 35, "image": "gone.png", "conversations": [
            {"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "!"}]}) + "\n")
    bad_lines = [i + 1 for i in corrupt] + [35, 36]   # JSONL line numbers (record i is line i + 1)
    return (path, imgs), bad_lines


RESUME_FLAGS = ("--warmup_steps", "100")   # lr depends on the step alone, not on the run's length


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, ragged, tiny_clip_dir):
    """One uninterrupted epoch on 2 processes: (its combined output, its out folder)."""
    out = tmp_path_factory.mktemp("two")
    proc = run_script(TORCHRUN + script(out, ragged[0], tiny_clip_dir, "--epochs", "1", *RESUME_FLAGS)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, out


@pytest.mark.slow
def test_bad_records_are_counted_exactly_once_over_ranks(ragged, two_processes):
    _, bad_lines = ragged
    output, _ = two_processes
    totals = re.findall(r"(\d+) problem\(s\)", output)
    assert totals and int(totals[-1]) == len(bad_lines), output[-3000:]
    for line in bad_lines:
        warned = [w for w in output.splitlines() if re.search(rf"line {line}\b", w)]
        assert len(warned) == 1, (line, warned)


@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path, ragged, two_processes, tiny_clip_dir, caplog):
    data, _ = ragged
    _, full = two_processes
    cut = tmp_path / "cut"
    proc = run_script(TORCHRUN + script(cut, data, tiny_clip_dir, "--epochs", "1", "--max_steps", "2",
                                        *RESUME_FLAGS)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(cut / "64_vlm_pretrain.pth")) == 2 and (cut / "64_vlm_pretrain.pth.resume").exists()

    # Another global batch cannot continue the same sequence of steps: say which flags can.
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, cut, "--from_scratch", "--epochs", "1", "--resume",
                                *RESUME_FLAGS))
    message = exit_message(exit_info)
    assert message.startswith("error:") and "\n" not in message
    assert "--batch_size 4 --accumulation_steps 2" in message

    # 1 process x 2 accumulation steps = the 2 x 4 it was written with: goes on as if never stopped.
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as exit_info:
        main("pretrain", common(data, tiny_clip_dir, cut, "--from_scratch", "--epochs", "1", "--resume",
                                "--accumulation_steps", "2", *RESUME_FLAGS))
    assert exit_info.value.code == 0
    steps = [int(n) for n in re.findall(r"step (\d+)/4 \(epoch 1/1\) loss", caplog.text)]
    assert steps == [3, 4]   # only the steps left
    a = torch.load(full / "64_vlm_pretrain.pth", weights_only=True)
    b = torch.load(cut / "64_vlm_pretrain.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    la, lb = (losses(folder / "64_vlm_pretrain.pth") for folder in (full, cut))
    assert len(la) == 4 and lb == pytest.approx(la, rel=1e-5)
