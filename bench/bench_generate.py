"""Generation speed of the 512x8 MiniMind-V on this CPU, against a re-implementation of the
original v1 decoding loop.

    python bench/bench_generate.py [--new_tokens 100] [--repeats 3] [--threads 2] [--no_compile]
    python bench/bench_generate.py --device cuda [--dtype bfloat16]

One picture plus a question, exactly `--new_tokens` new tokens (eos disabled), greedy. Prints
JSON: time to first token (picture encoding + prompt) and decode tokens/s, with the KV cache
(eager, compiled, and on CUDA replayed from a CUDA graph) and without it, and for the v1-style
baseline; each loop's `overhead_ms_per_token`, its decode time per token minus
`matmul_floor_ms_per_token` (its weight matmuls alone, timed in every round: the median of the
rounds' differences); the compile time and the answer length
from which compiling pays off; on CUDA the peak memory of each loop. Random weights and a
randomly initialised CLIP ViT-B/32 (built in memory from CLIPVisionConfig's defaults): speed
does not depend on the values. Each figure is the median of `--repeats` runs (a single run
without the cache), taken round-robin after one warm-up run of each loop. docs/decode_speed.md
has the results and what each optimisation bought.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.config import VLMConfig  # noqa: E402
from model.inference import DEFAULT_QUESTION, EVAL_IMAGES, build_prompt_ids, list_files  # noqa: E402
from model.vision import load_image  # noqa: E402
from model.prompt import load_tokenizer  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402

from bench_train import random_clip_b32  # noqa: E402  (same folder)
from machine import add_device_argument, cpu_name  # noqa: E402


class V1Baseline:
    """BASELINE, for comparison only: the decoding loop of MiniMind-V v1, re-implemented from its
    description on top of the same weights and self-contained (it does not call our modules, so
    speeding up ours cannot speed it up). What it does, as v1 did:

    - the KV cache is state on the attention modules (set as attributes, grown with torch.cat,
      repeated for the query heads by expand + reshape);
    - every step re-runs the placeholder search (unfold + compare + .item()) over the whole
      sequence so far and re-projects the image features, although only the prompt step uses
      them;
    - the decoding step uses plain matmul-softmax attention (v1 used SDPA only for T > 1),
      RoPE as a complex multiply, RMSNorm as x * rsqrt(mean(x^2) + eps);
    - the repetition penalty walks the distinct tokens of the sequence in Python every step
      (even at penalty 1.0, its default).
    The picture is encoded once by CLIP, as v1 did before its loop. Greedy.
    """

    def __init__(self, model: MiniMindVLM):
        self.m = model
        self.span = model.image_ids.numel()

    def find_placeholders(self, ids):
        windows = ids.unfold(1, self.span, 1)
        matches = (windows == self.m.image_ids).all(dim=2)
        return [(b, i.item()) for b in range(ids.shape[0]) for i in matches[b].nonzero()[:, 0]]

    @staticmethod
    def rms_norm(norm, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight

    @staticmethod
    def rope(x, pos_cis):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3).type_as(x)

    def attention(self, attn, x, pos_cis, use_cache):
        B, T, _ = x.shape
        q = self.rope(attn.wq(x).view(B, T, attn.n_heads, attn.head_dim), pos_cis)
        k = self.rope(attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim), pos_cis)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        if use_cache:
            if getattr(attn, "v1_k", None) is not None:
                k, v = torch.cat([attn.v1_k, k], 1), torch.cat([attn.v1_v, v], 1)
            attn.v1_k, attn.v1_v = k, v
        rep = attn.n_heads // attn.n_kv_heads
        S = k.shape[1]
        k = k[:, :, :, None].expand(B, S, attn.n_kv_heads, rep, attn.head_dim).reshape(B, S, -1, attn.head_dim)
        v = v[:, :, :, None].expand(B, S, attn.n_kv_heads, rep, attn.head_dim).reshape(B, S, -1, attn.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if T > 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(2, 3)) / math.sqrt(attn.head_dim)
            out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        return attn.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, ids, step_ids, start, image_features, use_cache):
        m = self.m
        h = m.tok_embeddings(step_ids)
        projected = m.vision_proj(image_features)             # every step
        for n, (b, i) in enumerate(self.find_placeholders(ids)):   # every step, whole sequence
            if i >= start:                                     # only the prompt step splices
                h[b, i - start:i - start + self.span] = projected[n]
        T = step_ids.shape[1]
        # v1's complex rotations, from our tables (which hold each angle twice: see rope_tables).
        pos_cis = torch.complex(m.rope_cos[start:start + T, ::2].float(), m.rope_sin[start:start + T, 1::2].float())
        for layer in m.layers:
            h = h + self.attention(layer.attention, self.rms_norm(layer.attention_norm, h), pos_cis, use_cache)
            ff = layer.feed_forward
            x = self.rms_norm(layer.ffn_norm, h)
            h = h + ff.w2(F.silu(ff.w1(x)) * ff.w3(x))
        return m.output(self.rms_norm(m.norm, h)[:, [-1]])[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values, max_new_tokens, use_cache=True, rp=1.0):
        """Greedy; yields [B, 1] per step like MiniMindVLM.generate(stream=True)."""
        for layer in self.m.layers:
            layer.attention.v1_k = layer.attention.v1_v = None
        # In the projector's dtype (CLIP's output under CUDA autocast may be another).
        image_features = self.m.vision_encoder(pixel_values).to(self.m.vision_proj.vision_proj[0].weight.dtype)
        ids = input_ids
        for step in range(max_new_tokens):
            start = ids.shape[1] - 1 if use_cache and step else 0
            logits = self.forward(ids, ids[:, start:], start, image_features, use_cache)
            for token in set(ids.tolist()[0]):
                logits[:, token] /= rp
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            yield ids[:, -1:]


def timed(steps, device):
    """(seconds to the first token, decode tokens/s after it, all tokens) of a token stream."""
    sync(device)
    t0 = time.perf_counter()
    tokens, first = [], None
    for tok in steps:
        tokens.append(int(tok[0, 0]))   # on CUDA this waits for the token, as a streaming reader does
        if first is None:
            first = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    return first - t0, (len(tokens) - 1) / (end - first), tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_floor_ms(model: MiniMindVLM, device, repeats: int = 20) -> dict:
    """Milliseconds per token of the weight matmuls alone (every 2-D weight of the decoder
    times one token's activation), in each of the two layouts a decoder can keep a weight in:
    as published ([out, in], `F.linear`) and transposed ([in, out], `x @ w`, what decoding uses
    for the stacked and output weights). The faster one is the floor under any decode step at
    batch 1 on this machine, whatever the bookkeeping around it costs. On CUDA the matmuls are
    replayed from a CUDA graph, so that the floor is the GPU's time for them, not the time to
    launch them."""
    weights = [w.detach() for name, w in model.named_parameters()
               if w.dim() == 2 and not name.startswith("vision_proj")]
    layouts = {"linear": (weights, lambda x, w: F.linear(x, w), 1),
               "transposed": ([w.t().contiguous() for w in weights], torch.matmul, 0)}
    floors = {}
    for layout, (stored, matmul, in_dim) in layouts.items():
        xs = {w.shape[in_dim]: torch.randn(1, w.shape[in_dim], device=device, dtype=w.dtype) for w in stored}

        def matmuls():
            for _ in range(repeats):
                for w in stored:
                    matmul(xs[w.shape[in_dim]], w)

        run = matmuls
        with torch.inference_mode():
            if device.type == "cuda":
                matmuls()   # warm-up (cuBLAS handles, workspaces) before capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    matmuls()
                run = graph.replay
            best = float("inf")
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                best = min(best, (time.perf_counter() - t0) / repeats * 1000)
        floors[layout] = best
    return floors


# Our decoding loop's variants: (compile_decoding's compile, cuda_graph). On CUDA also the
# eager step replayed from a CUDA graph, and the compiled step with and without one.
CPU_VARIANTS = {"kv_cache": (False, False), "compiled": (True, False)}
CUDA_VARIANTS = {"kv_cache": (False, False), "cuda_graph": (False, True), "compiled": (True, False),
                 "compiled_cuda_graph": (True, True)}


def first_difference(a, b):
    """Index of the first token where two answers differ (None if equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new_tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    add_device_argument(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile variants")
    args = p.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    config = VLMConfig.from_preset("512")
    model = MiniMindVLM(config, random_clip_b32()).eval().to(device, dtype)
    tokenizer = load_tokenizer()
    image = load_image(list_files([EVAL_IMAGES])[0])
    input_ids = torch.tensor([build_prompt_ids(tokenizer, DEFAULT_QUESTION, 1)], device=device)
    baseline = V1Baseline(model)

    # Generators: picture preprocessing happens inside the timed region, for every loop alike.
    def ours(use_cache=True, compile=False, cuda_graph=False):
        model.compile_decoding(compile, cuda_graph)   # cheap to repeat: compiled code is cached
        pixel_values = model.vision_encoder.preprocess([image])
        yield from model.generate(input_ids, max_new_tokens=args.new_tokens, eos_token_id=-1,
                                  use_cache=use_cache, stream=True, pixel_values=pixel_values)

    def v1():
        yield from baseline.generate(input_ids, model.vision_encoder.preprocess([image]), args.new_tokens)

    variants = CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    if args.no_compile:
        variants = {name: v for name, v in variants.items() if not v[0]}
    # (generator factory, repeats): without a cache every step re-reads the whole sequence,
    # so one run of it is enough to show the difference and keeps the bench short.
    runs = {name: (lambda c=c, g=g: ours(True, c, g), args.repeats) for name, (c, g) in variants.items()}
    runs.update({"no_kv_cache": (lambda: ours(False), 1), "v1_baseline": (v1, args.repeats)})
    # Warm-up, one run each; the first compiled run also compiles (timed, for the break-even).
    first_run_s = {}
    for name, (make, _) in runs.items():
        if name != "no_kv_cache":
            t0 = time.perf_counter()
            timed(make(), device)
            first_run_s[name] = time.perf_counter() - t0
            print(f"warm-up: {name} done", file=sys.stderr, flush=True)   # progress
    # Round-robin, so that a burst of load from other processes hits every loop alike.
    samples = {name: [] for name in runs}
    peak_mib = {}
    # The floor is measured in every round too: the machine's speed drifts by tens of percent
    # within a run, and an overhead is only meaningful against the floor of the same moment.
    round_floors = []
    for r in range(args.repeats):
        for name, (make, repeats) in runs.items():
            if r < repeats:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                samples[name].append(timed(make(), device) + (time.perf_counter() - t0,))
                if device.type == "cuda":
                    peak_mib[name] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
                print(f"run {r + 1}: {name} done", file=sys.stderr, flush=True)   # progress
        round_floors.append(matmul_floor_ms(model, device))
    floors = {layout: statistics.median(f[layout] for f in round_floors) for layout in round_floors[0]}
    floor_ms = min(floors.values())
    results = {}
    for name, got in samples.items():
        decode_ms = 1000 / statistics.median(s[1] for s in got)
        # What the loop costs beyond its weight matmuls, the part we control: in each round
        # against that round's floor, then the median.
        overhead_ms = statistics.median(1000 / s[1] - min(f.values()) for s, f in zip(got, round_floors))
        results[name] = {"ttft_s": round(statistics.median(s[0] for s in got), 4),
                         "decode_tok_s": round(1000 / decode_ms, 1),
                         "decode_ms_per_token": round(decode_ms, 3),
                         "overhead_ms_per_token": round(overhead_ms, 3),
                         "new_tokens": len(got[0][2])}
        if name in peak_mib:
            results[name]["peak_memory_mib"] = peak_mib[name]
    outputs = {name: got[0][2] for name, got in samples.items()}
    v1_step_ms = 1000 / results["v1_baseline"]["decode_tok_s"]
    report = {
        "config": f"dim={config.dim} n_layers={config.n_layers} vision=CLIP ViT-B/32 (random)",
        "prompt_tokens": input_ids.shape[1], "threads": args.threads, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "cpu": cpu_name(),
        # Other processes on the machine slow every figure: report how busy it was.
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        **results,
        "speedup_vs_v1": {
            "decode": round(results["kv_cache"]["decode_tok_s"] / results["v1_baseline"]["decode_tok_s"], 2),
            "ttft": round(results["v1_baseline"]["ttft_s"] / results["kv_cache"]["ttft_s"], 2)},
        # A decode step can never be faster than its weight matmuls: this bounds any speedup.
        "matmul_floor_ms_per_token": round(floor_ms, 3),
        "matmul_floor_by_weight_layout": {k: round(v, 3) for k, v in floors.items()},
        "max_possible_decode_speedup_vs_v1": round(v1_step_ms / floor_ms, 2),
    }
    compiled = [name for name, (compile, _) in variants.items() if compile]
    if compiled:
        # Compiling costs once per process, in the first compiled loop's warm-up (the next one
        # reuses the code), then saves on every token: the answer length from which it first
        # pays off, against the same loop eager.
        whole_s = statistics.median(s[3] for s in samples[compiled[0]])
        compile_s = first_run_s[compiled[0]] - whole_s
        report["compile_s"] = round(compile_s, 1)
        for name in compiled:
            eager = "cuda_graph" if variants[name][1] else "kv_cache"
            saved_ms = results[eager]["decode_ms_per_token"] - results[name]["decode_ms_per_token"]
            report[f"{name}_break_even_tokens"] = round(compile_s * 1000 / saved_ms) if saved_ms > 0 else None
    # Same weights: every loop must produce the same greedy tokens (in fp32; bf16 rounding may
    # tip a near tie differently in a differently fused loop: see first_difference).
    reference = outputs["kv_cache"]
    report["same_tokens"] = all(out == reference for out in outputs.values())
    report["first_difference"] = {name: first_difference(reference, out) for name, out in outputs.items()
                                  if out != reference}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
