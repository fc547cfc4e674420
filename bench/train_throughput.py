"""Training-step throughput: SPARO vs CLS read-out vs a plain DINO-style reference, side by side.

    python bench/train_throughput.py                     # the reference CPU configuration
    python bench/train_throughput.py --dino_repo ~/dino  # against the original DINO code
    python bench/train_throughput.py --arch vit_small --patch_size 16 --global_crops_size 224 \
        --local_crops_size 96 --local_crops_number 8 --out_dim 65536   # DINO's ViT-S/16 recipe

A step is everything one iteration does except data loading: teacher forward on the 2 global
crops, student forward and backward on all crops, loss, clipping, optimiser step and EMA.
Inputs are random tensors of the crop shapes. Every variant runs in this one process, after
warm-up steps, on the same inputs. Peak memory: CUDA's allocator peak on GPU; on CPU the growth
of the process's peak resident set (VmHWM, reset between variants) over its size before.

As in training: TF32 and cudnn.benchmark on CUDA (devices.enable_fast_fp32), and the device stage
of the augmentation (--augment_on_device, default on with CUDA): this project's steps then take
uint8 crops and run the photometric stage inside the step, as training does, while the
reference steps take float crops (their loaders augment on the CPU); the stage's own cost per
step is timed apart (`device stage`). The first warm-up step is timed apart too (with
--compile it is the compilation).

With --dino_repo PATH (a clone of facebookresearch/dino) the `dino` variant is DINO's own step
(bench/dino_original.py) and the variants are timed interleaved, round by round, after all of
them are built; each also reports its FLOPs (torch's FlopCounterMode) and the achieved GFLOP/s
against a GEMM peak measured here in the step's precision (bf16 under autocast).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augmentations  # noqa: E402
import config_files  # noqa: E402
import devices  # noqa: E402
import errors  # noqa: E402
import main_dino_sparo as dino  # noqa: E402
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402
from bench.dino_original import OriginalDinoStep, load_dino  # noqa: E402
from bench.dino_reference import ReferenceStep  # noqa: E402
from bench.measure import (STEP_AT, PeakMemory, bench_device, best_seconds, describe_device,  # noqa: E402
                           gemm_peak_gflops, header, random_crops, timed, write_json)

VARIANTS = (*vits.READOUTS, "reference", "dino")  # every read-out, and two reference steps


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_throughput", parents=[dino.get_args_parser()])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="sparo / cls / gap / cls_proj: this project's step with that read-out; reference: a "
                             "plain DINO-style step (bench/dino_reference.py, CLS read-out); dino: "
                             "the original DINO step (needs --dino_repo). Default: sparo cls "
                             "reference, or sparo cls dino with --dino_repo.")
    parser.add_argument("--dino_repo", default=None,
                        help="A clone of facebookresearch/dino: time its own training step against "
                             "this project's, interleaved round by round, with achieved GFLOP/s.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="With --dino_repo: rounds of --steps timed steps per variant, "
                             "interleaved; the best round counts.")
    parser.add_argument("--gemm_size", type=int, default=2048, help="Square GEMM of the measured peak.")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps per variant.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant.")
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    # The reference configuration of the speed issue (2-core CPU): vit_tiny/4, 28/12 px crops.
    parser.set_defaults(arch="vit_tiny", patch_size=4, global_crops_size=28, local_crops_size=12,
                        local_crops_number=6, batch_size_per_gpu=64, out_dim=4096, epochs=100)
    return parser


def variant_crops(variant: str, args: argparse.Namespace, crops: Dict[bool, List[torch.Tensor]]) -> List[torch.Tensor]:
    """This project's steps take uint8 crops when the device stage is on; DINO's own step and
    the reference take float crops (their loaders augment on the CPU)."""
    return crops[bool(args.augment_on_device) and variant in vits.READOUTS]


def build_step(variant: str, args: argparse.Namespace) -> Callable:
    if variant == "reference":
        return ReferenceStep(args)
    if variant == "dino":  # the original code, in the precision of this project's step
        return OriginalDinoStep(load_dino(args.dino_repo), args, dino.autocast_context(args)[0])
    models, optimisation = dino.build_training(argparse.Namespace(**{**vars(args), "readout": variant}))
    train_step = dino.TrainStep(models, optimisation, args)
    return lambda *step_args: train_step(*step_args).loss  # as the other steps: the loss


def warm_up(step: Callable, crops: List[torch.Tensor], args: argparse.Namespace) -> Optional[float]:
    """The untimed steps; returns the seconds of the first one (with --compile: compilation)."""
    seconds = [timed(lambda: step(crops, *STEP_AT), args.device)[1] for _ in range(args.warmup_steps)]
    return seconds[0] if seconds else None


def time_steps(step: Callable, crops: List[torch.Tensor], args: argparse.Namespace) -> Tuple[float, float]:
    """Milliseconds per step over --steps steps, and the last step's loss."""
    losses, seconds = timed(lambda: [step(crops, *STEP_AT) for _ in range(args.steps)], args.device)
    return seconds / args.steps * 1000, losses[-1].detach().item()


def build_and_warm_up(variant: str, args: argparse.Namespace,
                      crops: List[torch.Tensor]) -> Tuple[Callable, PeakMemory, Optional[float]]:
    """A variant's step, built and warmed up with the peak memory counted from before it was
    built, and the seconds of its first step."""
    torch.manual_seed(0)
    memory = PeakMemory(args.device)
    memory.start()
    step = build_step(variant, args)
    return step, memory, warm_up(step, crops, args)


def measure(variant: str, args: argparse.Namespace, crops: List[torch.Tensor]) -> Dict[str, float]:
    """One variant built, warmed up and timed on its own (its peak memory over all of it)."""
    step, memory, first_step_s = build_and_warm_up(variant, args, crops)
    step_ms, loss = time_steps(step, crops, args)
    return dict(step_ms=step_ms, peak_mib=memory.stop(), loss=loss, first_step_s=first_step_s)


def step_flops(step: Callable, crops: List[torch.Tensor]) -> float:
    """Floating-point operations of one step (matmuls, convolutions, attention; forward and
    backward), counted by torch's FlopCounterMode on an untimed step."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(crops, *STEP_AT)
    return float(counter.get_total_flops())


def measure_interleaved(args: argparse.Namespace, crops: Dict[bool, List[torch.Tensor]]) -> Dict[str, Dict[str, float]]:
    """Every variant built and warmed up, then timed in rounds, variant after variant, so that
    the machine's load changes hit all of them alike; each variant's best round counts."""
    steps, results = {}, {}
    for variant in args.variants:
        inputs = variant_crops(variant, args, crops)
        steps[variant], memory, first_step_s = build_and_warm_up(variant, args, inputs)
        results[variant] = dict(peak_mib=memory.stop(), step_ms=float("inf"), first_step_s=first_step_s,
                                gflop_per_step=step_flops(steps[variant], inputs) / 1e9)
    for _ in range(args.rounds):
        for variant, step in steps.items():
            ms, results[variant]["loss"] = time_steps(step, variant_crops(variant, args, crops), args)
            results[variant]["step_ms"] = min(results[variant]["step_ms"], ms)
    for result in results.values():
        result["gflop_per_s"] = result["gflop_per_step"] / result["step_ms"] * 1000
    return results


def join_single_process_group() -> bool:
    """DINO's loss all-reduces its centre: give it a process group of one (gloo). Returns
    whether a group was created here (and is to be destroyed after the run)."""
    if dist.is_initialized():
        return False
    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return True


def main(argv: List[str] | None = None) -> Dict[str, Dict[str, float]]:
    args = config_files.parse_args_with_config(get_args_parser(), argv)
    args.device = bench_device(args.device)  # --device comes from main_dino_sparo's flags
    args.rank, args.world_size, args.distributed = 0, 1, False
    args.gpu = 0 if args.device.type == "cuda" else None
    dino.check_args(args)
    devices.enable_fast_fp32(args.device)  # TF32 and cudnn.benchmark, as training sets them
    if args.augment_on_device is None:  # training's default: the device stage on with CUDA
        args.augment_on_device = augmentations.default_on_device(args.device)
    if args.variants is None:
        args.variants = ["sparo", "cls", "dino" if args.dino_repo else "reference"]
    if "dino" in args.variants:
        if not args.dino_repo:
            raise errors.UserError("the dino variant needs --dino_repo PATH (a clone of facebookresearch/dino)")
        load_dino(args.dino_repo)  # a wrong path fails here, before any timing
        if join_single_process_group():
            try:
                return run(args)
            finally:
                utils.cleanup_distributed()
    return run(args)


def device_stage_ms(args: argparse.Namespace, crops: List[torch.Tensor]) -> float:
    """Milliseconds per step of the device stage alone on the recipe's uint8 crops (best of
    --rounds rounds of --steps batches, after one warm-up batch)."""
    stage = augmentations.PhotometricAugmentation(args.local_crops_number, args.global_crops_size)
    stage(crops)
    return best_seconds(lambda: stage(crops), args.device, args.rounds, args.steps) * 1000


def run(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    crops = {False: random_crops(args, args.batch_size_per_gpu)}
    if args.augment_on_device:
        crops[True] = random_crops(args, args.batch_size_per_gpu, uint8=True)
    precision = dino.precision(args)
    print(header(args.device))
    print(f"config: {args.arch}/{args.patch_size}, batch {args.batch_size_per_gpu}, 2x{args.global_crops_size}px + "
          f"{args.local_crops_number}x{args.local_crops_size}px crops, out_dim {args.out_dim}, "
          f"{precision}, compile={args.compile}, device stage in this project's steps: {bool(args.augment_on_device)}")
    results, peak = {}, None
    if args.dino_repo:
        dtype = devices.autocast_dtype(args.device, args.use_fp16, args.cpu_bf16) or torch.float32
        peak = gemm_peak_gflops(args.gemm_size, args.device, dtype)
        print(f"measured {str(dtype).split('.')[-1]} GEMM peak ({args.gemm_size}^3): {peak:.1f} GFLOP/s; "
              f"{args.rounds} interleaved rounds of {args.steps} steps, best round per variant")
        results = measure_interleaved(args, crops)
    else:
        results = {variant: measure(variant, args, variant_crops(variant, args, crops)) for variant in args.variants}
    for variant, r in results.items():
        r["images_per_s"] = args.batch_size_per_gpu / r["step_ms"] * 1000
        line = (f"{variant:>10}: {r['images_per_s']:8.1f} images/s  {r['step_ms']:9.1f} ms/step  "
                f"peak {r['peak_mib']:8.1f} MiB")
        if peak:
            line += (f"  {r['gflop_per_step'] / args.batch_size_per_gpu:.2f} GFLOP/image  "
                     f"{r['gflop_per_s']:.1f} GFLOP/s = {100 * r['gflop_per_s'] / peak:.0f}% of the GEMM peak")
        if args.compile and r["first_step_s"] is not None:
            line += f"  first step (compilation) {r['first_step_s']:.1f} s"
        print(line, flush=True)
    stage_ms = device_stage_ms(args, crops[True]) if args.augment_on_device else None
    if stage_ms is not None:
        print(f"device stage alone: {stage_ms:.2f} ms/step (inside the steps above)")
    for a, b in [("sparo", "cls"), ("sparo", "reference"), ("cls", "reference"), ("sparo", "dino"), ("cls", "dino")]:
        if a in results and b in results:
            print(f"{a}/{b} throughput ratio: {results[a]['images_per_s'] / results[b]['images_per_s']:.3f}  "
                  f"peak memory ratio: {results[a]['peak_mib'] / max(results[b]['peak_mib'], 1e-9):.3f}")
    write_json(args.output_json, dict(
        device=describe_device(args.device), torch=torch.__version__, precision=precision,
        tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark,
        gemm_peak_gflops=peak, device_stage_ms=stage_ms, config=utils.plain(args), results=results))
    return results


if __name__ == "__main__":
    errors.run_main(main)
