"""Cost and benefit of the fp32 prototype layer under autocast (issue 23, item 3).

    python bench/prototype_precision.py                 # both head sizes, CPU bf16 autocast
    python bench/prototype_precision.py --device cuda   # on a GPU (bf16 or fp16 by capability)

Times the DINO head's forward and backward (student on every crop, teacher on the two global
crops) with the prototype layer in fp32 (vision_transformer.DINOHead) and in the autocast
dtype (the old behaviour), alternately in one process, and reports the error that rounding the
logits to that dtype puts into the teacher's probabilities.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import devices  # noqa: E402
import vision_transformer as vits  # noqa: E402
from bench.measure import timed, write_json  # noqa: E402

# (name, head input width, hidden, bottleneck, prototypes, images, crops)
HEADS = [("cpu recipe (SPARO vit_nano)", 4096, 512, 256, 1024, 64, 4),
         ("DINO ViT-S/16 (SPARO, 65536 prototypes)", 4096, 2048, 256, 65536, 64, 10)]


class AutocastHead(vits.DINOHead):
    """The old head: its prototype layer runs in the autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def step_seconds(head: torch.nn.Module, x: torch.Tensor, globals_: int, autocast: torch.autocast) -> float:
    def step() -> None:
        with autocast:
            student = head(x)
            with torch.no_grad():
                teacher = head(x[:globals_])
        (student.float().logsumexp(-1).mean() + teacher.float().mean()).backward()
    return timed(step, x.device)[1]


def teacher_probability_error(head: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype,
                              temp: float = 0.04) -> float:
    """Mean relative error of the teacher's softmax(logits / temp) when logits are rounded."""
    with torch.no_grad():
        logits = head(x).float()
        exact = F.softmax(logits.double() / temp, -1)
        rounded = F.softmax(logits.to(dtype).double() / temp, -1)
    weight = exact / exact.sum(-1, keepdim=True)
    return float(((rounded - exact).abs() / exact.clamp_min(1e-30) * weight).sum(-1).mean())


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser("prototype_precision")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=None,
                        help="Images per batch instead of the recipes' 64 (a quicker look).")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = devices.autocast_dtype(device, use_fp16=True, cpu_bf16=True)
    results = {}
    for name, in_dim, hidden, bottleneck, out_dim, images, crops in HEADS:
        images = args.images or images
        torch.manual_seed(0)
        fp32_head = vits.DINOHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck).to(device)
        old_head = AutocastHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck).to(device)
        old_head.load_state_dict(fp32_head.state_dict())
        x = torch.randn(images * crops, in_dim, device=device)
        times = {"fp32 prototypes": [], "autocast prototypes": []}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for label, head in (("fp32 prototypes", fp32_head), ("autocast prototypes", old_head)):
                times[label].append(step_seconds(head, x, 2 * images,
                                                 torch.autocast(device.type, dtype=dtype)))
        medians = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
        results[name] = dict(seconds=medians,
                             ratio=medians["fp32 prototypes"] / medians["autocast prototypes"],
                             teacher_p_error=teacher_probability_error(fp32_head, x[:2 * images], dtype))
        print(f"{name}: head fwd+bwd {medians['fp32 prototypes'] * 1e3:.0f} ms with fp32 prototypes vs "
              f"{medians['autocast prototypes'] * 1e3:.0f} ms in {dtype} (x{results[name]['ratio']:.2f}); "
              f"{dtype} logits put a {100 * results[name]['teacher_p_error']:.2f} % mean error in "
              f"the teacher's probabilities (T = 0.04)", flush=True)
    write_json(args.output_json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
