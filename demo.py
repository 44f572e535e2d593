"""The whole MiniMind-V pipeline, offline, on a CPU, in minutes - and proof that it learns.

    python demo.py            # full demo (about 10 minutes on 2 CPU cores)
    python demo.py --quick    # reduced demo (CI's end-to-end test)
    python demo.py --video    # and then a video stage: which way does the shape move?

1. generates pictures of coloured shapes with Chinese captions and questions, in the original
   data formats (dataset/demo/; the SFT set also as Parquet with the pictures inside, the
   official layout, which that stage trains from), and a small random frozen CLIP
   (model/vision_model/demo-clip);
2. runs the real training scripts: 1-pretrain_vlm.py, 2-sft_vlm.py, 2-sft_vlm.py --multi
   (a small LLM trained from scratch, demo preset);
3. answers questions about held-out pictures with the inference code of 3-eval_chat.py,
   scores them, and writes out/demo/report.md (+ report.json, a picture grid, loss curves);
4. with --video: generates short clips of one moving (or still) shape, trains 2-sft_vlm.py on
   them from the two-picture model, and scores its answers to held-out clips (direction,
   shape) from their keyframes, as 3-eval_chat.py --video answers.
The vision encoder is a random demo encoder: the pictures are simple enough that a frozen random
projection keeps colour, shape, position and count. For real pictures use the real CLIP.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from demo_shapes import (CLIP_FILES, generate_clip_data, generate_demo_data, make_demo_clip,  # noqa: E402
                         names_colour_and_shape, score_answer)
from demo_shapes.clips import N_KEYFRAMES  # noqa: E402
from model.config import DEMO_VISION_MODEL as DEMO_CLIP, VLMConfig, device_name, number_in  # noqa: E402
TAG = VLMConfig.from_preset("demo").tag          # output files are out/demo/{TAG}_vlm_*.pth
# "caption" needs colour, shape and count right; the pretrain target only colour and shape (1/18).
CHANCE = {"caption": 1 / 54, "colour": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "count": 1 / 3, "multi": 1 / 2}
VIDEO_CHANCE = {"direction": 1 / 5, "shape": 1 / 3}

# Sizes and schedule of a run. "full" aims at the accuracy targets in the README; "quick" is the
# CI smoke test: the same pipeline with less data and fewer steps.
PLANS = {
    # What the tiny model needs most is steps: shape (circle vs square) is learned late. Epochs
    # over cached pictures are the cheapest steps (each new picture costs a CLIP forward), and
    # they do not overfit at this size.
    # The two-picture stage takes batches of 16: the extra updates help "which picture has X?"
    # more than another epoch would. The video stage takes 6 epochs: telling a still shape from
    # one that starts where it stands is learnt last. The quick two-picture stage takes 2
    # epochs: its first steps (a new prompt layout, loss ~4) unsettle what SFT taught, and one
    # epoch stopped there, colour anywhere from 20% to 100% on last-bit differences in training.
    # The quick SFT takes 2 epochs: after one, colour questions were still answered with a
    # shape on one host (75%), after two 100% for every seed tried there.
    # What was measured: docs/demo_notes.md.
    "full": dict(n_pretrain=6000, n_sft=5000, n_multi=3000, n_rehearsal=500, n_heldout=480,
                 pretrain=dict(epochs=5, lr=3e-3, batch_size=32), sft=dict(epochs=2, lr=2e-3, batch_size=32),
                 multi=dict(epochs=5, lr=2e-3, batch_size=16),
                 n_video=2000, n_video_heldout=200, n_video_rehearsal=500,
                 video=dict(epochs=6, lr=1e-3, batch_size=16)),
    "quick": dict(n_pretrain=2000, n_sft=2000, n_multi=400, n_rehearsal=400, n_heldout=120,
                  pretrain=dict(epochs=5, lr=3e-3, batch_size=32), sft=dict(epochs=2, lr=2e-3, batch_size=32),
                  multi=dict(epochs=2, lr=1e-3, batch_size=32),
                  n_video=200, n_video_heldout=40, n_video_rehearsal=50,
                  video=dict(epochs=1, lr=1e-3, batch_size=16)),
}


def train_stage(script, stage_args, data, images, plan, args, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, script), "--preset", "demo", "--vision_model", DEMO_CLIP,
           "--data_path", data, *(["--images_path", images] if images else []), "--out_dir", args.out_dir,
           "--epochs", str(plan["epochs"]), "--learning_rate", str(plan["lr"]),
           "--batch_size", str(args.batch_size or plan["batch_size"]), "--max_seq_len", "512", "--cache_features",
           "--num_workers", "0", "--log_interval", "10", "--save_interval", "100000",
           "--seed", str(args.seed), "--device", args.device, *stage_args, *extra]
    if args.no_progress:
        cmd.append("--no_progress")
    # The line a user could paste to run the stage alone.
    print("$ " + shlex.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]), flush=True)
    t0 = time.time()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:   # the stage said why on its own stderr
        raise StageFailed(f"{script} stopped (exit code {code}); the demo stops with it")
    return time.time() - t0


class StageFailed(Exception):
    """A training stage that did not finish: its own error line is already on the screen."""


def sft_as_parquet(data_dir) -> str:
    """The SFT set in the official Parquet layout (pictures inside), written once per data."""
    from scripts.convert_data import json_to_parquet

    source, parquet = os.path.join(data_dir, "sft_data.jsonl"), os.path.join(data_dir, "sft_i2t.parquet")
    if not os.path.exists(parquet) or os.path.getmtime(parquet) < os.path.getmtime(source):
        json_to_parquet(source, os.path.join(data_dir, "sft_images"), parquet, keep_order=True, progress=False)
    return parquet


def evaluate(weights, records, device, batch_size=64):
    """Greedy answers of `weights` to held-out `records`, through the CLI's inference code.

    Answered `batch_size` at a time: greedy answers do not depend on the batch size, so the
    scores are those of asking one by one, only faster."""
    import torch

    from model.inference import Request, Sampling, answer_batch, load_model, reuse_freed_memory
    from model.prompt import load_tokenizer

    reuse_freed_memory()   # as 3-eval_chat.py: batched answers allocate and free megabytes per layer
    torch.manual_seed(0)
    model = load_model(weights, DEMO_CLIP, device)
    tokenizer = load_tokenizer()
    greedy = Sampling(temperature=0.0, max_new_tokens=48)   # the longest references ("which" answers) are ~40 tokens
    # The inference code puts one <image> mark per picture (for a clip: the line introducing
    # its keyframes, then theirs) before the question, as training did.
    requests = [Request(rec["question"].replace("<video>\n", ""), rec["keyframes"], clip=True) if "keyframes" in rec
                else Request(rec["question"].replace("<image>\n", ""), rec["paths"]) for rec in records]
    answers = answer_batch(model, tokenizer, requests, greedy, batch_size)
    results = []
    for rec, reply in zip(records, answers):
        text = reply.text_or_raise()   # a held-out picture that cannot be read stops the demo
        results.append({**rec, "prediction": text, "correct": bool(score_answer(rec, text)),
                        "colour_and_shape": bool(rec["qtype"] == "caption" and names_colour_and_shape(rec, text))})
    return results


def held_out(demo_dir):
    records = []
    with open(os.path.join(demo_dir, "heldout.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            names = [n.strip() for n in rec["image"].split(",")]
            rec["paths"] = [os.path.join(demo_dir, "heldout_images", n) for n in names]
            records.append(rec)
    return records


def held_out_clips(demo_dir):
    """The held-out clip questions, each with the keyframes the model is asked about."""
    from model.video import read_keyframes

    data, folder = CLIP_FILES["video_heldout"]
    with open(os.path.join(demo_dir, data), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for rec in records:
        rec["keyframes"] = read_keyframes(os.path.join(demo_dir, folder, rec["video"]), N_KEYFRAMES)
    return records


def accuracy(results):
    by_type = defaultdict(list)
    for r in results:
        by_type[r["qtype"]].append(r["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(by_type.items())}


def colour_shape(caption_results):
    return sum(r["colour_and_shape"] for r in caption_results) / max(len(caption_results), 1)


def picture_grid(results, path, n=12, cols=4, cell=160, slots=2):
    """Held-out pictures (a clip: its keyframes side by side) with a green (right) or red (wrong)
    frame, numbered for the report's table (Chinese text stays in the Markdown: no CJK font is
    needed). Each example gets room for `slots` pictures."""
    from PIL import Image, ImageDraw

    shown = results[:n]
    pad = 8
    rows = (len(shown) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (slots * cell + pad) + pad, rows * (cell + 30) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, r in enumerate(shown):
        x0 = pad + (k % cols) * (slots * cell + pad)
        y0 = pad + (k // cols) * (cell + 30)
        pictures = r.get("keyframes") or [Image.open(p) for p in r["paths"]]
        for j, picture in enumerate(pictures):
            grid.paste(picture.convert("RGB").resize((cell, cell)), (x0 + j * cell, y0 + 22))
        width = cell * len(pictures)
        colour = (30, 160, 60) if r["correct"] else (210, 40, 40)
        draw.rectangle([x0 - 2, y0 + 20, x0 + width + 1, y0 + 22 + cell + 1], outline=colour, width=3)
        draw.text((x0, y0 + 4), f"#{k + 1} {r['qtype']}", fill=(0, 0, 0))
    grid.save(path)


def machine(device: str) -> str:
    """What the report says the demo ran on."""
    cores = f"{os.cpu_count()} CPU cores"
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))}, {cores}"
    return cores if device == "cpu" else f"{device}, {cores}"


def write_report(args, plan, timings, acc_final, acc_caption, results, caption_results, video=None):
    """`video`: the video stage's results, accuracy and picture_accuracy (the video model's on
    the picture questions), when it ran."""
    out = args.out_dir
    picture_grid(results, os.path.join(out, "heldout_grid.png"))
    report = {"plan": args.plan, "timings_s": timings, "accuracy": acc_final,
              "pretrain_caption_accuracy": acc_caption["caption"],
              "pretrain_caption_colour_shape": colour_shape(caption_results), "chance": CHANCE,
              "n_heldout": len(results), "machine": machine(args.device)}
    if video:
        picture_grid(video["results"], os.path.join(out, "video_strip.png"), n=VIDEO_SHOWN, cols=2, cell=112,
                     slots=N_KEYFRAMES)
        report.update(video_accuracy=video["accuracy"], video_chance=VIDEO_CHANCE,
                      n_video_heldout=len(video["results"]), video_model_picture_accuracy=video["picture_accuracy"])
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    lines = ["# MiniMind-V offline demo", "",
             f"Plan `{args.plan}` on {machine(args.device)}, demo LLM trained from scratch, "
             "frozen random demo CLIP.", "", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "## Held-out accuracy (pictures; model: sft_multi)", "", "| question | accuracy | chance |",
              "|---|---|---|"]
    lines += [f"| {k} | {v:.1%} | {CHANCE[k]:.0%} |" for k, v in acc_final.items()]
    lines += [f"| caption by the pretrain model | {acc_caption['caption']:.1%} | {CHANCE['caption']:.0%} |",
              f"| caption by the pretrain model names colour and shape | "
              f"{report['pretrain_caption_colour_shape']:.1%} | {1 / 18:.0%} |", "",
              "## Examples", "", "![held-out pictures](heldout_grid.png)", "",
              "| # | question | model answer | reference | right |", "|---|---|---|---|---|"]
    for k, r in enumerate(results[:12]):
        q = r["question"].replace("<image>", "🖼").replace("\n", " ")
        lines.append(f"| {k + 1} | {q} | {r['prediction']} | {r['answer']} | {'✓' if r['correct'] else '✗'} |")
    lines += ["", "## Pretrain captions", ""]
    lines += [f"- {r['prediction']} (reference: {r['answer']})" for r in caption_results[:5]]
    if video:
        lines += video_report(video)
    lines += ["", "## Loss curves", ""]
    for stage in ("pretrain", "sft", "sft_multi", "sft_video"):
        name = f"{TAG}_vlm_{stage}_loss.png"
        if os.path.exists(os.path.join(out, name)):
            lines.append(f"![{stage}]({name})")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return report


def video_stage(args, plan, picture_records, timings):
    """Clips: their data, a stage on them from the two-picture model, and its answers to held-out
    clips (and to the picture questions: what it kept). Adds its wall times to `timings`."""
    d, out = args.data_dir, args.out_dir
    t0 = time.time()
    generate_clip_data(d, seed=args.seed, n_train=plan["n_video"], n_heldout=plan["n_video_heldout"],
                       n_rehearsal=plan["n_video_rehearsal"])
    timings["video data"] = time.time() - t0
    data, folder = CLIP_FILES["video"]
    weights = os.path.join(out, f"{TAG}_vlm_sft_video.pth")
    timings["sft_video"] = train_stage(
        "2-sft_vlm.py", ["--init_weight", os.path.join(out, f"{TAG}_vlm_sft_multi.pth"), "--save_weight", weights,
                         "--frames", str(N_KEYFRAMES)],
        os.path.join(d, data), os.path.join(d, folder), plan["video"], args)
    t0 = time.time()
    results = evaluate(weights, held_out_clips(d), args.device)
    pictures = evaluate(weights, picture_records, args.device)
    timings["video evaluation"] = time.time() - t0
    return {"results": results, "accuracy": accuracy(results), "picture_accuracy": accuracy(pictures)}


VIDEO_SHOWN = 20   # held-out clips in the strip and the report's table


def video_report(video):
    """The report's video section (Markdown lines)."""
    lines = ["", "## Video: held-out clips (model: sft_video)", "",
             f"{len(video['results'])} new clips of one shape moving left to right, right to left, top to bottom, "
             f"bottom to top, or standing still; the model sees {N_KEYFRAMES} keyframes of each "
             "(`3-eval_chat.py --video`'s input).", "",
             "| question | accuracy | chance |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1%} | {VIDEO_CHANCE[k]:.0%} |" for k, v in video["accuracy"].items()]
    lines += ["", "The video model on the picture questions (the table above is the sft_multi model's):", "",
              "| question | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in video["picture_accuracy"].items()]
    lines += ["", f"Each row of the strip: two clips, each as its {N_KEYFRAMES} keyframes in time order.", "",
              "![held-out clips](video_strip.png)", "",
              "| # | question | model answer | reference | right |", "|---|---|---|---|---|"]
    for k, r in enumerate(video["results"][:VIDEO_SHOWN]):
        q = r["question"].replace("<video>", "🎞").replace("\n", " ")
        lines.append(f"| {k + 1} | {q} | {r['prediction']} | {r['answer']} | {'✓' if r['correct'] else '✗'} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced demo (CI): less data, fewer steps")
    p.add_argument("--video", action="store_true",
                   help="then train on clips from the two-picture model and score held-out clips")
    p.add_argument("--out_dir", default=os.path.join("out", "demo"))
    p.add_argument("--data_dir", default=os.path.join("dataset", "demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=number_in(int, 1), default=None,
                   help="every stage's batch size (default: the plan's)")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return run_demo(args)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # an output folder that cannot be made, a full disk, ...
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run_demo(args) -> int:
    args.plan = "quick" if args.quick else "full"
    plan = PLANS[args.plan]
    os.makedirs(args.out_dir, exist_ok=True)
    timings = {}
    t_all = time.time()

    t0 = time.time()
    generate_demo_data(args.data_dir, seed=args.seed, n_pretrain=plan["n_pretrain"], n_sft=plan["n_sft"],
                       n_multi=plan["n_multi"], n_heldout=plan["n_heldout"], n_rehearsal=plan["n_rehearsal"])
    make_demo_clip(DEMO_CLIP)
    sft_data = sft_as_parquet(args.data_dir)
    timings["data + demo CLIP"] = time.time() - t0

    d = args.data_dir
    timings["pretrain"] = train_stage("1-pretrain_vlm.py", ["--from_scratch"], os.path.join(d, "pretrain_data.jsonl"),
                                      os.path.join(d, "pretrain_images"), plan["pretrain"], args)
    timings["sft"] = train_stage("2-sft_vlm.py", [], sft_data, "", plan["sft"], args)
    timings["sft_multi"] = train_stage("2-sft_vlm.py", ["--multi"], os.path.join(d, "sft_multi_data.jsonl"),
                                       os.path.join(d, "sft_multi_images"), plan["multi"], args)

    t0 = time.time()
    records = held_out(d)
    results = evaluate(os.path.join(args.out_dir, f"{TAG}_vlm_sft_multi.pth"), records, args.device)
    captions = [r for r in records if r["qtype"] == "caption"]
    caption_results = evaluate(os.path.join(args.out_dir, f"{TAG}_vlm_pretrain.pth"), captions, args.device)
    timings["evaluation"] = time.time() - t0
    video = video_stage(args, plan, records, timings) if args.video else None
    timings["total"] = time.time() - t_all
    report = write_report(args, plan, timings, accuracy(results), accuracy(caption_results), results, caption_results,
                          video)

    print("\nHeld-out accuracy (final model):")
    for k, v in report["accuracy"].items():
        print(f"  {k:9s} {v:6.1%}   (chance {CHANCE[k]:.0%})")
    print(f"  pretrain captions {report['pretrain_caption_accuracy']:.1%} "
          f"(colour and shape right: {report['pretrain_caption_colour_shape']:.1%})")
    if video:
        print("Held-out clips (video model):")
        for k, v in report["video_accuracy"].items():
            print(f"  {k:9s} {v:6.1%}   (chance {VIDEO_CHANCE[k]:.0%})")
        on_pictures = report["video_model_picture_accuracy"]
        print("  picture questions: " + ", ".join(f"{k} {v:.1%}" for k, v in on_pictures.items()))
    print("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"Report: {os.path.join(args.out_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
