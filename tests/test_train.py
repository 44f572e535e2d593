"""The shared trainer: stages and output names, DDP parity, kill/resume, feature cache, bad data."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, common, history, losses, make_data, run_stage, save_tiny_clip
from trainer import trainer
from trainer.trainer import StepSampler, build_parser, lr_at, main, resolve

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return make_data(folder)


# ------------------------------------------------------------------------------ pure functions
def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_sampler_splits_steps_the_same_way_for_any_split_of_the_global_batch():
    single = StepSampler(42, 8, seed=3)
    single.set_epoch(1)
    ranks = []
    for r in range(2):
        s = StepSampler(42, 4, rank=r, world=2, seed=3)
        s.set_epoch(1)
        ranks.append(list(s))
    assert [a + b for a, b in zip(*ranks)] == list(single)       # rank slices make the step's batch
    accumulated = StepSampler(42, 4, accumulation=2, seed=3)
    accumulated.set_epoch(1)
    micro = list(accumulated)
    assert micro[0::2] == ranks[0] and micro[1::2] == ranks[1]    # 1 process x 2 micro-batches == 2 ranks
    assert len(single) == 5 and len(accumulated) == 10              # the ragged tail (2 of 42) is left out
    assert sorted(single.left_out(1) + [i for b in single for i in b]) == list(range(42))
    single.set_epoch(2)
    other_epoch = list(single)
    single.set_epoch(1, start_step=2)
    assert list(single) == [a + b for a, b in zip(*ranks)][2:]  # resume skips exactly
    assert other_epoch != [a + b for a, b in zip(*ranks)]       # shuffled anew every epoch
    grouped = StepSampler(40, 4, seed=0, lengths=list(range(40)))
    spread = [max(b) - min(b) for b in grouped]
    assert max(spread) <= 10                                    # similar lengths share a step


def test_sampler_reads_a_window_of_row_groups_at_a_time():
    group_of = np.repeat(np.arange(10), 10)          # 10 row groups of 10 samples
    sampler = StepSampler(100, 5, seed=1, read_groups=(group_of, 2))
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for batch in sampler for i in batch]
        assert sorted(order) == list(range(100))      # every sample once per epoch
        windows = [set(group_of[order[w:w + 20]]) for w in range(0, 100, 20)]
        assert all(len(groups) == 2 for groups in windows)   # 2 row groups per 20 samples
    first = list(sampler)
    sampler.set_epoch(0)
    assert first != list(sampler)                     # a new order every epoch
    assert [set(group_of[b]) for b in first] != [set(group_of[b]) for b in list(sampler)]


def test_data_workers_default_to_at_most_the_usable_cpus(monkeypatch):
    # torch warns (and loading may stall) when a loader has more workers than CPUs to run them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert build_parser("pretrain").parse_args([]).num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert build_parser("sft").parse_args([]).num_workers == 4


def test_bool_flags_are_real_flags_that_also_take_v1s_word(capsys):
    parser = build_parser("sft")
    assert parser.parse_args(["--multi"]).multi and not parser.parse_args([]).multi
    assert parser.parse_args(["--multi", "True"]).multi          # v1's README: `2-sft_vlm.py --multi True`
    assert not parser.parse_args(["--multi", "False"]).multi     # v1 (type=bool) read it as true
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--multi", "maybe"])
    assert exit_info.value.code == 2 and "'maybe' is not True or False" in capsys.readouterr().err


def test_v1_command_lines_run(tmp_path, monkeypatch):
    """v1's flags that have no work left to do here are taken, not refused as unknown; v1's
    data files are found where v1 looked for them."""
    monkeypatch.chdir(tmp_path)
    for stage, data in (("pretrain", "dataset/LLaVA-Pretrain/chat-translated.json"),
                        ("sft", "dataset/LLaVA-Instruct/llava_instruct_230k.json")):
        assert resolve(build_parser(stage).parse_args([]), stage).data_path != data
        (tmp_path / data).parent.mkdir(parents=True)
        (tmp_path / data).write_text("[]")
        args = resolve(build_parser(stage).parse_args([]), stage)
        assert (args.data_path, args.images_path) == (data, f"dataset/{stage}_images")
    v1 = ["--ddp", "--warmup_iters", "0", "--local-rank=1", "--visual_encoder", "clip"]
    args = resolve(build_parser("pretrain").parse_args(v1), "pretrain")
    assert args.warmup_steps == 0 and args.stage == "pretrain"
    multi = str(tmp_path / "output.json")
    args = resolve(build_parser("sft").parse_args(v1 + ["--multi", "True", "--save_last", "True",
                                                        "--data_path_multi", multi]), "sft")
    assert args.stage == "sft_multi" and args.data_path == multi
    args = resolve(build_parser("sft").parse_args(["--data_path_multi", multi]), "sft")
    assert args.stage == "sft" and args.data_path != multi   # as in v1: --multi's data only


# ------------------------------------------------------------------------------ whole stages
def test_three_stages_chain_with_original_names(tmp_path, data, tiny_clip_dir, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert run_stage("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--epochs", "3")) == 0
    assert re.findall(r"epoch (\d) done\.", caplog.text) == ["1", "2", "3"]
    assert (out / "64_vlm_pretrain.pth").exists() and (out / "64_vlm_pretrain_loss.png").exists()
    pre = losses(out / "64_vlm_pretrain.pth")
    assert pre[-1] < pre[0] - 1.0                     # it learns
    assert run_stage("sft", common(data, tiny_clip_dir, out, "--epochs", "1")) == 0
    assert (out / "64_vlm_sft.pth").exists()
    assert losses(out / "64_vlm_sft.pth")[0] < pre[0]  # started from the pretrain weights
    multi = make_data(tmp_path / "multi", n=16, multi=True)
    assert run_stage("sft", common(multi, tiny_clip_dir, out, "--epochs", "1", "--multi")) == 0
    assert (out / "64_vlm_sft_multi.pth").exists()


def test_freeze_llm_trains_projector_only(tmp_path, data, tiny_clip_dir, caplog):
    out = tmp_path / "out"
    run_stage("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "1",
                                 "--save_weight", str(out / "start.pth")))
    with caplog.at_level("INFO"):
        run_stage("pretrain", common(data, tiny_clip_dir, out, "--init_weight", str(out / "start.pth"),
                                     "--max_steps", "2"))       # pretrain from weights: LLM frozen
    # 32 records, batch 4: the run ends inside its first epoch, and the log says so.
    assert re.search(r"epoch 1 stopped after 2 of 8 steps\. \S+: 32 record\(s\), 32 in use, no problems",
                     caplog.text), caplog.text
    before, after = torch.load(out / "start.pth"), torch.load(out / "64_vlm_pretrain.pth")
    assert torch.equal(before["layers.0.attention.wq.weight"], after["layers.0.attention.wq.weight"])
    assert not torch.equal(before["vision_proj.vision_proj.0.weight"], after["vision_proj.vision_proj.0.weight"])


def test_missing_start_weights_is_one_line(tmp_path, data, tiny_clip_dir):
    with pytest.raises(SystemExit, match="^error: starting weights .*64_vlm_pretrain.pth not found.*previous stage"):
        main("sft", common(data, tiny_clip_dir, tmp_path))
    with pytest.raises(SystemExit, match="full_sft"):
        main("pretrain", common(data, tiny_clip_dir, tmp_path))


def test_v1s_clip_folder_is_used_when_ours_is_not_there(tmp_path, tiny_clip_dir, monkeypatch):
    import shutil

    import model.config as config

    ours, v1 = tmp_path / "vision_model" / "clip", tmp_path / "clip_model" / "clip"
    monkeypatch.setattr(config, "DEFAULT_VISION_MODEL", str(ours))
    monkeypatch.setattr(config, "V1_VISION_MODEL", str(v1))

    def chosen():
        return resolve(build_parser("pretrain").parse_args([]), "pretrain").vision_model

    assert chosen() == str(ours)   # neither there: the error names ours
    shutil.copytree(tiny_clip_dir, v1)
    assert chosen() == str(v1)
    shutil.copytree(tiny_clip_dir, ours)
    assert chosen() == str(ours)
    assert resolve(build_parser("pretrain").parse_args(["--vision_model", "x"]), "pretrain").vision_model == "x"


def test_every_missing_input_is_named_in_one_run(tmp_path, data, tiny_clip_dir, capsys):
    """A user with nothing downloaded learned of CLIP, then (next run) of the data, then of the
    LLM weights."""
    nowhere = tmp_path / "nowhere"
    args = common((str(nowhere / "captions.parquet"), data[1]), str(nowhere / "clip"), tmp_path,
                  "--val_data", str(nowhere / "val.jsonl"))
    with pytest.raises(SystemExit) as exit_info:
        main("pretrain", args)
    said = exit_info.value.code.splitlines()
    assert said[0] == "error: 4 inputs of this run are missing or unusable:", said
    assert re.match(r"  - vision model not found at .*nowhere/clip: download openai/clip-vit-base-patch32", said[1])
    assert re.match(r"  - data file .*nowhere/captions.parquet not found", said[2])
    assert re.match(r"  - data file .*nowhere/val.jsonl not found", said[3])
    assert re.match(r"  - starting weights .*64_llm.pth not found: download MiniMind's full_sft_64.pth", said[4])
    assert not (tmp_path / "64_vlm_pretrain.pth").exists()


def test_no_data_in_either_default_layout_names_both(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no dataset/ here
    with pytest.raises(SystemExit, match=r"^error: no training data at dataset/sft_i2t.parquet, dataset/sft_data.jsonl "
                                         r"or dataset/LLaVA-Instruct/llava_instruct_230k.json \(see README.*\): "
                                         r"put it there, or give --data_path$"):
        main("sft", ["--preset", "tiny", "--vision_model", tiny_clip_dir, "--from_scratch"])


def test_a_missing_images_folder_is_one_error_not_one_per_record(tmp_path, data, tiny_clip_dir, caplog):
    with caplog.at_level("WARNING"), pytest.raises(SystemExit, match=r"^error: images folder .*nowhere not found: "
                                                   r".* names its pictures as files in it$"):
        main("pretrain", common((data[0], str(tmp_path / "nowhere")), tiny_clip_dir, tmp_path, "--from_scratch"))
    assert "image file missing" not in caplog.text


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_and_a_log_file_gets_lines_with_the_time_left(tmp_path, data, tiny_clip_dir,
                                                                             caplog, monkeypatch):
    """Under nohup the bar was one endless line in the log, with the loss hidden inside it."""
    args = [a for a in common(data, tiny_clip_dir, tmp_path, "--from_scratch", "--epochs", "2", "--max_steps", "9")
            if a != "--no_progress"]   # 32 records, batch 4: 8 steps an epoch
    with caplog.at_level("INFO"):
        run_stage("pretrain", args)   # pytest's stderr is no terminal
    lines = re.findall(r"step (\d+)/9 \(epoch (\d)/2\) loss [\d.]+ lr \S+ \d+ tok/s(, \d+m left)?$", caplog.text, re.M)
    assert [(int(s), int(e)) for s, e, _ in lines] == [(s, 1 if s <= 8 else 2) for s in range(1, 10)], caplog.text
    assert [bool(left) for _, _, left in lines] == [False] + [True] * 7 + [False]   # timed from step 1 on
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.clear()
    with caplog.at_level("INFO"):
        run_stage("pretrain", args + ["--save_weight", str(tmp_path / "again.pth")])
    bar = terminal.getvalue()
    assert "pretrain epoch 1/2: 100%" in bar and "pretrain epoch 2/2:  12%" in bar and "loss=" in bar, bar
    assert not re.search(r"step \d+/9", caplog.text)


def test_accumulation_equals_bigger_batch(tmp_path, data, tiny_clip_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    run_stage("pretrain", common(data, tiny_clip_dir, a, "--from_scratch", "--max_steps", "3",
                                 "--batch_size", "8"))
    run_stage("pretrain", common(data, tiny_clip_dir, b, "--from_scratch", "--max_steps", "3",
                                 "--batch_size", "4", "--accumulation_steps", "2"))
    # Same samples in the step, so the same loss and the same gradient (an undivided sum of
    # micro-batch losses would double its norm). Later steps are not compared: Adam turns
    # round-off in near-zero gradients into full-size updates of either sign.
    ha, hb = history(a / "64_vlm_pretrain.pth")[0], history(b / "64_vlm_pretrain.pth")[0]
    assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-5)
    assert hb["grad_norm"] == pytest.approx(ha["grad_norm"], rel=1e-4)


def test_validation_loss_and_bad_records_are_counted(tmp_path, data, tiny_clip_dir, caplog):
    folder = tmp_path / "bad"
    path, imgs = make_data(folder, n=12)
    (folder / "imgs" / "3.png").write_bytes(b"not a png at all")          # corrupt picture
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n{broken json\n")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        run_stage("pretrain", common((path, imgs), tiny_clip_dir, out, "--from_scratch", "--epochs", "1",
                                     "--val_data", data[0], "--val_images_path", data[1], "--val_interval", "1"))
    assert "3.png" in caplog.text and "line 13" in caplog.text
    h = history(out / "64_vlm_pretrain.pth")
    assert any("val_loss" in x and x["val_loss"] > 0 for x in h)
    with pytest.raises(ValueError, match="line 13"):   # main() turns it into one line
        run_stage("pretrain", common((path, imgs), tiny_clip_dir, out, "--from_scratch", "--strict"))


def test_validation_covers_every_held_out_record(tmp_path, data, tiny_clip_dir):
    """5 held-out records: all of them, whatever the batch size (a set smaller than one batch was
    refused, and the ragged tail of a bigger one left out). With --learning_rate 0 the model stays
    as it starts, so batches of 2+2+1 and one batch of 5 must give the same token mean."""
    held_out = make_data(tmp_path / "held_out", n=5)
    losses = {}
    for batch_size in ("2", "8"):
        out = tmp_path / f"out{batch_size}"
        run_stage("pretrain", common(data, tiny_clip_dir, out, "--from_scratch", "--max_steps", "1",
                                     "--learning_rate", "0", "--batch_size", batch_size,
                                     "--val_data", held_out[0], "--val_images_path", held_out[1]))
        losses[batch_size] = [h["val_loss"] for h in history(out / "64_vlm_pretrain.pth") if "val_loss" in h]
    assert len(losses["2"]) == 1 and losses["8"] == pytest.approx(losses["2"], rel=1e-5)
    only_four = make_data(tmp_path / "four", n=4)   # the 5th record changes the mean: it was counted
    run_stage("pretrain", common(data, tiny_clip_dir, tmp_path / "out4", "--from_scratch", "--max_steps", "1",
                                 "--learning_rate", "0", "--val_data", only_four[0], "--val_images_path", only_four[1]))
    assert [h["val_loss"] for h in history(tmp_path / "out4" / "64_vlm_pretrain.pth") if "val_loss" in h] != \
        pytest.approx(losses["2"], rel=1e-5)


def test_check_data_reports_without_training(tmp_path, tiny_clip_dir, capsys, caplog):
    folder = tmp_path / "bad"
    path, imgs = make_data(folder, n=6)
    (folder / "imgs" / "2.png").write_bytes(b"")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert run_stage("pretrain", common((path, imgs), tiny_clip_dir, out, "--check_data")) == 1
    assert "2.png" in caplog.text and "1 problem" in capsys.readouterr().out
    assert not out.exists() or not list(out.glob("*.pth"))


def test_many_bad_records_are_counted_after_the_first_lines(tmp_path, tiny_clip_dir, caplog, monkeypatch):
    """Beyond PROBLEMS_LOGGED bad records the run stops naming each (a folder of missing
    pictures is not worth a line per record) but still counts them all."""
    from trainer import trainer

    monkeypatch.setattr(trainer, "PROBLEMS_LOGGED", 2)
    path, imgs = make_data(tmp_path / "d", n=12)
    for i in (1, 4, 6, 9, 11):
        os.remove(os.path.join(imgs, f"{i}.png"))
    with caplog.at_level("INFO"):
        run_stage("pretrain", common((path, imgs), tiny_clip_dir, tmp_path / "out", "--from_scratch", "--max_steps", "1"))
    named = [r.getMessage() for r in caplog.records if "): image file missing: " in r.getMessage()]
    assert len(named) == 2
    assert caplog.text.count("more bad records than 2: from here on they are counted") == 1
    assert "5 problem(s)" in caplog.text and "     5  image file missing" in caplog.text


# ------------------------------------------------------------------------------ feature cache
def test_cached_features_match_live_and_invalidate(tmp_path, tiny_clip_dir):
    folder = tmp_path / "d"
    data = make_data(folder, n=16)
    live, cached = tmp_path / "live", tmp_path / "cached"
    run_stage("pretrain", common(data, tiny_clip_dir, live, "--from_scratch", "--max_steps", "6"))
    run_stage("pretrain", common(data, tiny_clip_dir, cached, "--from_scratch", "--max_steps", "6",
                                 "--cache_features"))
    assert losses(cached / "64_vlm_pretrain.pth") == pytest.approx(losses(live / "64_vlm_pretrain.pth"), abs=2e-3)
    cache_root = cached / "feature_cache"
    (fingerprint,) = os.listdir(cache_root)
    def cached_pictures():
        return len(np.load(cache_root / fingerprint / "keys.npy"))

    assert cached_pictures() == 16                          # one entry per picture
    # The same pictures reached through symlinks (as the demo's SFT sets do) are not encoded again.
    linked = folder / "linked"
    linked.mkdir()
    for png in (folder / "imgs").iterdir():
        (linked / png.name).symlink_to(os.path.join("..", "imgs", png.name))
    run_stage("pretrain", common((data[0], str(linked)), tiny_clip_dir, cached, "--from_scratch",
                                 "--max_steps", "1", "--cache_features"))
    assert cached_pictures() == 16
    # A changed picture gets a new entry; the others are reused.
    time.sleep(0.01)
    Image.new("RGB", (224, 224), (0, 0, 0)).save(folder / "imgs" / "0.png")
    run_stage("pretrain", common(data, tiny_clip_dir, cached, "--from_scratch", "--max_steps", "1",
                                 "--cache_features"))
    assert cached_pictures() == 17
    # Another vision model gets another cache folder.
    other = save_tiny_clip(tmp_path / "other-clip", seed=1)
    run_stage("pretrain", common(data, other, cached, "--from_scratch", "--max_steps", "1", "--cache_features"))
    assert len(os.listdir(cache_root)) == 2


# ------------------------------------------------------------------------------ processes
def script_cmd(data, clip, out, *extra):
    return [sys.executable, os.path.join(ROOT, "1-pretrain_vlm.py"),
            *common(data, clip, out, "--from_scratch", *extra)]


def test_ddp_two_processes_match_one(tmp_path, data, tiny_clip_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(script_cmd(data, tiny_clip_dir, one, "--max_steps", "4", "--batch_size", "8"),
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    cmd = script_cmd(data, tiny_clip_dir, two, "--max_steps", "4")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one / "64_vlm_pretrain.pth"), losses(two / "64_vlm_pretrain.pth")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4)


def test_ddp_with_text_only_samples_and_moe_matches_one_process(tmp_path, tiny_clip_dir):
    """DDP runs without find_unused_parameters: a rank whose micro-batch is text only still
    gives the projector a gradient, and an MoE expert no token chose still runs (on nothing).
    Otherwise the next step stops with torch's "Expected to have finished reduction" error."""
    folder = tmp_path / "d"
    path, imgs = make_data(folder, n=8)
    with open(path, "a", encoding="utf-8") as f:
        for i in range(8):
            f.write("\n" + json.dumps({"id": f"text{i}", "image": "", "conversations": [
                {"from": "human", "value": f"第{i}个问题，没有图片。"}, {"from": "gpt", "value": "好的。"}]},
                ensure_ascii=False))
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ("--max_steps", "6", "--use_moe")
    subprocess.run(script_cmd((path, imgs), tiny_clip_dir, one, *steps, "--batch_size", "2"),
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    cmd = script_cmd((path, imgs), tiny_clip_dir, two, *steps, "--batch_size", "1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + cmd[1:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr
    a, b = losses(one / "64_moe_vlm_pretrain.pth"), losses(two / "64_moe_vlm_pretrain.pth")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)


def test_killed_run_resumes_exactly(tmp_path, data, tiny_clip_dir):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ("--epochs", "4", "--save_interval", "3")
    subprocess.run(script_cmd(data, tiny_clip_dir, full, *args), check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(script_cmd(data, tiny_clip_dir, killed, *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = killed / "64_vlm_pretrain.pth.resume"
    deadline = time.time() + 120
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(resume, weights_only=True)   # plain tensors and values: nothing can run code
    assert 0 < state["step"] < 32, "the run must be killed mid-way"
    subprocess.run(script_cmd(data, tiny_clip_dir, killed, *args, "--resume"), check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    a, b = history(full / "64_vlm_pretrain.pth"), history(killed / "64_vlm_pretrain.pth")
    assert [h["step"] for h in a] == [h["step"] for h in b]
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-5)
    wa, wb = torch.load(full / "64_vlm_pretrain.pth"), torch.load(killed / "64_vlm_pretrain.pth")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)


def test_a_rerun_without_resume_warns_that_it_replaces_an_unfinished_run(tmp_path, data, tiny_clip_dir, caplog):
    """A crash, then the same command without --resume: the first save replaced the resume file."""
    stage = common(data, tiny_clip_dir, tmp_path, "--from_scratch", "--max_steps", "2", "--save_interval", "1")
    with pytest.MonkeyPatch.context() as patch:   # killed after its first save
        patch.setattr(trainer, "optimizer_step", stop_at_second_step(trainer.optimizer_step))
        with pytest.raises(trainer.Interrupted):
            run_stage("pretrain", stage)
    warning = (r"64_vlm_pretrain.pth.resume holds step 1 of an unfinished run, which this one \(from step 0\) "
               r"replaces at its first save: to go on with that run instead, stop now and add --resume")
    with caplog.at_level("WARNING"):
        run_stage("pretrain", stage)
    assert re.search(warning, caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_stage("pretrain", stage)   # over a finished run: a deliberate rerun, nothing to warn about
    assert "add --resume" not in caplog.text


def stop_at_second_step(step):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    return wrapped


def test_wandb_offline_run_directory(tmp_path, data, tiny_clip_dir):
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(script_cmd(data, tiny_clip_dir, out, "--max_steps", "2", "--use_wandb"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, data, tiny_clip_dir):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_stage("pretrain", common(data, tiny_clip_dir, eager, "--from_scratch", "--max_steps", "3"))
    run_stage("pretrain", common(data, tiny_clip_dir, compiled, "--from_scratch", "--max_steps", "3", "--compile"))
    assert losses(compiled / "64_vlm_pretrain.pth") == pytest.approx(losses(eager / "64_vlm_pretrain.pth"), rel=1e-4)
    a = torch.load(eager / "64_vlm_pretrain.pth", weights_only=True)
    b = torch.load(compiled / "64_vlm_pretrain.pth", weights_only=True)
    assert a.keys() == b.keys()           # published keys, no `_orig_mod.`
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)


def test_v1_sft_pictures_are_found_under_their_coco_prefix(tmp_path, tiny_clip_dir, caplog, capsys):
    """v1's SFT records name "123.jpg" where its folder holds "COCO_train2014_123.jpg" (v1 added
    the prefix in code): training, checking and converting find them without --image_prefix."""
    from dataset.records import JsonRecords
    from scripts.check_data import main as check_main
    from scripts.convert_data import json_to_parquet

    path, imgs = make_data(tmp_path / "d", n=8)
    for name in os.listdir(imgs):
        os.rename(os.path.join(imgs, name), os.path.join(imgs, "COCO_train2014_" + name))
    assert JsonRecords(path, imgs).image_prefix == "COCO_train2014_"
    with caplog.at_level("INFO"):
        run_stage("sft", common((path, imgs), tiny_clip_dir, tmp_path / "out", "--from_scratch", "--max_steps", "1"))
    assert "its pictures are COCO_train2014_<name>" in caplog.text
    assert "8 record(s), 8 in use, no problems" in caplog.text
    with pytest.raises(ValueError, match="has 0 usable records"):
        run_stage("sft", common((path, imgs), tiny_clip_dir, tmp_path / "out2", "--from_scratch", "--max_steps", "1",
                                "--image_prefix", ""))   # '' asks for no prefix
    assert check_main(["--data_path", path, "--images_dir", imgs]) == 0
    assert json_to_parquet(path, imgs, str(tmp_path / "d.parquet"), progress=False)["rows"] == 8
    capsys.readouterr()

    # Where the plain names are there (the demo's data, v1's pretrain data), nothing is guessed.
    os.rename(os.path.join(imgs, "COCO_train2014_0.png"), os.path.join(imgs, "0.png"))
    assert JsonRecords(path, imgs).image_prefix == ""
