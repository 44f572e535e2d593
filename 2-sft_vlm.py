"""Stage 2: instruction tuning on image conversations; `--multi` for two-image conversations.

    python 2-sft_vlm.py            # from out/512_vlm_pretrain.pth -> out/512_vlm_sft.pth
    python 2-sft_vlm.py --multi    # from out/512_vlm_sft.pth -> out/512_vlm_sft_multi.pth
Options: python 2-sft_vlm.py --help
"""
from trainer.trainer import main

if __name__ == "__main__":
    main("sft")
