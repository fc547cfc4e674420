"""What eval_linear.py's learning-rate grid costs against DINO's single head, on cached features.

    python bench/probe_grid_cost.py                       # Fashion-MNIST-sized: 54k x 4096 / 5 x 96
    python bench/probe_grid_cost.py --num_train 1281167 --num_classes 1000 --device cuda

Random features of the widths the linear probe sees (SPARO's L*V encoding: one feature variant;
the CLS read-out: the concatenation of DINO's 4 variants), random labels, eval_linear's own
LinearProbes / head_losses / SGD step. For each read-out it times --epochs epochs of the whole
grid (19 learning rates x the read-out's feature variants) and of one head (DINO's --lr
protocol: one variant, one rate) over the same batches, and prints the ratio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval_linear  # noqa: E402
import vision_transformer as vits  # noqa: E402
from bench.measure import best_seconds, describe_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("probe_grid_cost")
    parser.add_argument("--num_train", type=int, default=54000,
                        help="Training features (Fashion-MNIST's 60k minus the 10%% hold-out).")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--arch", default="vit_nano", help="Backbone whose CLS token width is used.")
    parser.add_argument("--sparo_slots", type=int, default=64, help="L: the SPARO encoding is L*V wide.")
    parser.add_argument("--sparo_dim", type=int, default=64, help="V.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser


def time_heads(specs: List[eval_linear.ProbeSpec], features: torch.Tensor, labels: torch.Tensor,
               args: argparse.Namespace) -> float:
    """Seconds per epoch of training `specs` together (eval_linear's training step)."""
    probes = eval_linear.LinearProbes(specs, args.num_classes, seed=0).to(args.device)
    optimizer = torch.optim.SGD([dict(params=head.parameters(), lr=spec.lr)
                                 for head, spec in zip(probes.heads, specs)], momentum=0.9)
    def epoch() -> None:
        for start in range(0, len(features), args.batch_size):
            batch, target = features[start:start + args.batch_size], labels[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            eval_linear.head_losses(probes(batch), target).sum().backward()
            optimizer.step()
    epoch()  # warm-up
    return best_seconds(epoch, torch.device(args.device), rounds=1, calls=args.epochs)


def grid_specs(readout: str, args: argparse.Namespace) -> Tuple[int, List[eval_linear.ProbeSpec]]:
    """The extracted feature's width and eval_linear's default grid for `readout`."""
    flags = argparse.Namespace(lr=None, lr_grid=None, n_last_blocks=None, avgpool_patchtokens=None)
    config = dict(readout=readout, arch=args.arch, sparo_slots=args.sparo_slots, sparo_dim=args.sparo_dim)
    layout, specs = eval_linear.probe_grid(flags, config, vits.ARCHS[args.arch][1], None)
    return layout.width, specs


def main() -> Dict[str, float]:
    args = get_args_parser().parse_args()
    print(f"{describe_device(torch.device(args.device))}; "
          f"{args.num_train} features, {args.num_classes} classes, batch {args.batch_size}")
    torch.manual_seed(0)
    labels = torch.randint(0, args.num_classes, (args.num_train,), device=args.device)
    ratios = {}
    for readout in ("sparo", "cls"):
        width, specs = grid_specs(readout, args)
        features = torch.randn(args.num_train, width, device=args.device)
        # DINO's single head: the encoding, or the CLS tokens of the last 4 blocks
        one = [next(spec for spec in specs if spec.n_last_blocks in (None, 4) and not spec.avgpool)]
        grid_seconds, one_seconds = time_heads(specs, features, labels, args), time_heads(one, features, labels, args)
        ratios[readout] = grid_seconds / one_seconds
        print(f"{readout:>5}: {len(specs)} heads {grid_seconds:.2f} s/epoch, one head ({one[0].describe()}, "
              f"{one[0].stop - one[0].start} wide) {one_seconds:.2f} s/epoch: grid / one = {ratios[readout]:.1f}x")
    return ratios


if __name__ == "__main__":
    main()
