"""Stage 1: teach the projector (and optionally the LLM) to describe pictures (caption data).

    python 1-pretrain_vlm.py                         # one GPU or CPU
    torchrun --nproc_per_node 4 1-pretrain_vlm.py    # four GPUs
Options: python 1-pretrain_vlm.py --help
"""
from trainer.trainer import main

if __name__ == "__main__":
    main("pretrain")
