"""Command line: generate the offline demo's data and its demo CLIP (demo.py does this itself).

    python -m demo_shapes [--out_dir dataset/demo] [--seed 0] [--force]

Run from the repository root (the default paths are relative to it). Complete output with
the same settings is reused rather than regenerated; --force regenerates it.
"""
import argparse
import time

from model.config import number_in

from .encoder import DEMO_CLIP_PATH, make_demo_clip
from .records import DEMO_DATA_DIR, generate_demo_data


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo_shapes",
                                description="Generate the offline shapes demo data and the demo CLIP.")
    p.add_argument("--out_dir", default=DEMO_DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if complete output exists")
    # Defaults: the sizes of `python demo.py` (its "full" plan), so the two share the output.
    p.add_argument("--n_pretrain", type=number_in(int, 0), default=6000)
    p.add_argument("--n_sft", type=number_in(int, 0), default=5000)
    p.add_argument("--n_multi", type=number_in(int, 0), default=3000)
    p.add_argument("--n_rehearsal", type=number_in(int, 0), default=500,
                   help="single-picture records mixed into sft_multi")
    p.add_argument("--n_heldout", type=number_in(int, 0), default=480)
    p.add_argument("--clip_path", default=DEMO_CLIP_PATH)
    p.add_argument("--clip_hidden_size", type=number_in(int, 1), default=512)
    p.add_argument("--clip_layers", type=number_in(int, 1), default=1)
    args = p.parse_args(argv)
    t0 = time.time()
    m = generate_demo_data(args.out_dir, args.seed, args.n_pretrain, args.n_sft, args.n_multi,
                           args.n_heldout, n_rehearsal=args.n_rehearsal, force=args.force)
    print(f"data: {args.out_dir} (pretrain {m['n_pretrain']}, sft {m['n_sft']}, multi {m['n_multi']} "
          f"+ {m['n_rehearsal']} rehearsal, held-out {m['n_heldout']}) in {time.time() - t0:.1f}s")
    t0 = time.time()
    make_demo_clip(args.clip_path, seed=args.seed, hidden_size=args.clip_hidden_size,
                   num_layers=args.clip_layers, force=args.force)
    print(f"demo CLIP: {args.clip_path} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
