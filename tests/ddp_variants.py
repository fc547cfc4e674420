"""Train every model variant for one short epoch in ONE multi-process launch (not a test file):

    torchrun --nproc_per_node=2 tests/ddp_variants.py OUTPUT_DIR [VARIANT ...]

Each variant is a real main_dino_sparo.train_dino() run (DDP, checkpoint in OUTPUT_DIR/<variant>),
all in one process group. Launching once keeps the start-up cost of torchrun and the imports to
one for all variants. A variant that fails stops the launch with a non-zero exit.
"""
import argparse
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config_files  # noqa: E402
import main_dino_sparo as dino  # noqa: E402
import utils  # noqa: E402
from helpers import TINY_TRAIN_ARGS  # noqa: E402

# Every read-out and every SPARO option that changes the parameters or the graph.
VARIANTS = {
    "cls": ["--readout", "cls"],
    "sparo": ["--readout", "sparo"],
    "sparo_separate_kv": ["--readout", "sparo", "--sparo_share_kv", "false"],
    "sparo_global_norm": ["--readout", "sparo", "--sparo_norm", "global"],
    "sparo_keep_all_blocks": ["--readout", "sparo", "--sparo_keep_all_blocks", "true"],
    "gap": ["--readout", "gap"],
    "cls_proj": ["--readout", "cls_proj"],
}
# 64 images / (2 processes x 16) = 2 iterations per epoch; vit_nano: DDP does not depend on the size.
SHORT_RUN = ["--device", "cpu", "--arch", "vit_nano", "--subset", "64", "--batch_size_per_gpu", "16", "--epochs", "1", "--print_freq", "1"]


def main(output_dir: str, names: List[str]) -> None:
    parser = argparse.ArgumentParser(parents=[dino.get_args_parser()])
    try:
        for name in names or VARIANTS:
            flags = VARIANTS[name]
            print(f"=== variant {name}", flush=True)
            args = config_files.parse_args_with_config(
                parser, [*TINY_TRAIN_ARGS, *SHORT_RUN, *flags, "--output_dir", str(Path(output_dir) / name)])
            dino.train_dino(args)  # joins the process group once and stays in it
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
