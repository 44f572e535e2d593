"""Every check that needs a CUDA GPU, in one run sized for a short loan of one.

    python bench/cuda_check.py --out DIR          # on the GPU machine (default DIR: $OUT)
    python bench/cuda_check.py --device cpu       # here: the same steps at smoke sizes
    python bench/cuda_check.py --dry_run          # parse every step's arguments, run nothing

The steps, each under its own time limit and each run even when an earlier one failed:

    cuda_tests      the tests marked `cuda` (tests/test_cuda.py): bf16 training steps, the
                    feature cache on the GPU, generation (eager, CUDA graph, compiled) against
                    the pinned answers
    bench_train     bench/bench_train.py --device cuda at batch 64: samples/s live and cached,
                    MFU, peak memory, against the v1 step
    bench_generate  bench/bench_generate.py --device cuda (bf16): time to first token, decode
                    tokens/s eager, as a CUDA graph and compiled, peak memory

It writes, into DIR: summary.json (the GPU, torch, and each step's exit status and seconds),
each bench's JSON (<step>.json) and each step's log (<step>.log): at most 8 files, which is what
the device tool brings back. The limits add up to under 9 minutes, so a 15-minute loan leaves
room to start the machine and to rerun one step (--only NAME).

The GPU machine has what these steps import (torch, transformers, pyarrow, tqdm, pytest). It
lacks PyAV, which only clips need (pictures train without it): nothing needs carrying.
    python3 bench/cuda_check.py            # as the device command, with timeout_s 590
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

# name: (seconds allowed, arguments on CUDA, arguments for the CPU smoke run)
STEPS = {
    "cuda_tests": (210, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"],
                   ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]),
    "bench_train": (140, ["bench/bench_train.py", "--device", "cuda", "--batch_size", "64", "--samples", "1024",
                          "--steps", "10"],
                    ["bench/bench_train.py", "--steps", "1", "--samples", "4", "--batch_size", "2"]),
    "bench_generate": (170, ["bench/bench_generate.py", "--device", "cuda", "--dtype", "bfloat16",
                             "--new_tokens", "256", "--repeats", "5"],
                       ["bench/bench_generate.py", "--new_tokens", "4", "--repeats", "1", "--no_compile"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the results (default: $OUT)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same steps at smoke sizes, to try this script where there is no GPU")
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="run just these steps")
    p.add_argument("--dry_run", action="store_true", help="check every step's arguments, run nothing")
    args = p.parse_args(argv)
    if not args.dry_run and not args.out:
        p.error("--out is needed (or the OUT environment variable)")
    return args


def step_arguments(name, device):
    seconds, on_cuda, smoke = STEPS[name]
    return seconds, on_cuda if device == "cuda" else smoke


def check_arguments():
    """Parse each bench step's arguments with the bench's own parser (CUDA swapped for the CPU,
    which is all this machine may have): a wrong flag fails here, not on the GPU's clock."""
    sys.path.insert(0, BENCH)
    import bench_generate
    import bench_train

    parsers = {"bench_train": bench_train.parse_args, "bench_generate": bench_generate.parse_args}
    for name, parse in parsers.items():
        for device in ("cuda", "cpu"):
            argv = ["cpu" if a == "cuda" else a for a in step_arguments(name, device)[1][1:]]
            parse(argv)
    return {name: {device: " ".join(step_arguments(name, device)[1]) for device in ("cuda", "cpu")}
            for name in STEPS}


def run_step(name, device, out):
    """Run one step with its time limit; its stdout is a bench's JSON (kept as <name>.json if it
    parses), everything else goes to <name>.log."""
    seconds, arguments = step_arguments(name, device)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=seconds)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timed out"
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (e.stdout, e.stderr))
    result = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "limit_s": seconds,
              "command": " ".join(arguments)}
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    if report is not None:
        with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        stdout = ""
    with open(os.path.join(out, f"{name}.log"), "w", encoding="utf-8") as f:
        f.write(stdout + stderr)
    return result


def describe_machine():
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print(json.dumps({"steps": check_arguments()}, indent=1))
        return 0
    os.makedirs(args.out, exist_ok=True)
    summary = {"device": args.device, "machine": describe_machine(), "steps": {}}
    for name in args.only or STEPS:
        print(f"== {name}", flush=True)
        summary["steps"][name] = run_step(name, args.device, args.out)
        print(json.dumps(summary["steps"][name]), flush=True)
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)   # after every step: a run cut short keeps what it did
    return 0 if all(s["rc"] == 0 for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
