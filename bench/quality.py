"""Does SPARO beat the CLS read-out? A small, reproducible DINO experiment on Fashion-MNIST.

    python bench/quality.py                        # the full table (hours on 2 CPU cores: RESULTS.md)
    python bench/quality.py --quick                # the same pipeline, small (minutes)
    python bench/quality.py --eval_split heldout    # for tuning: never touches the test split

Every variant is pre-trained by the real command-line script (main_dino_sparo.py, in a
subprocess) with the same small-data recipe (configs/quality/recipe_cpu.yaml) and the same budget
(images, epochs, crops, batch), then evaluated by the real eval_knn.py (weighted 20-NN,
T=0.07, cosine) and eval_linear.py (a linear probe on frozen features). Next to them: the
raw-pixel k-NN floor (computed with knn.py's k-NN code on the raw 28x28 pixels) and
each variant's network untrained (randomly initialised), to tell what the architecture gives
from what pre-training adds. For SPARO, greedy slot selection (eval_knn.py --select_slots,
scored on a held-out part of the training bank) is reported next to all slots.

Evaluation data. --eval_split test: the k-NN bank and the linear probe's training set are
the first --bank_size images of Fashion-MNIST's official training split (default: all 60k),
and the test set is the official 10k test split (its first --test_size images); the scripts
read them from the built-in data set (--data_path fashion_mnist --train_subset/--test_subset).
--eval_split heldout: the test set is replaced by training images 50000..50000+test_size,
which pre-training never sees (--pretrain_subset must stay at or below 50000); use it to
tune, never the test split. These images are written once as ImageFolders (DINO's
DATA/train, DATA/val layout, grey PNGs) so that the evaluation scripts read exactly them.

Results: OUTPUT_DIR/results.json and OUTPUT_DIR/results.md. Every finished step leaves its
own JSON file, so rerunning the same command after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import datasets  # noqa: E402
import knn  # noqa: E402
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402

RECIPE = REPO / "configs" / "quality" / "recipe_cpu.yaml"
LINEAR = REPO / "configs" / "quality" / "linear.yaml"
HELDOUT_START = 50000  # training images from here on are never pre-trained on (tuning split)

# name -> (what it is, extra pre-training flags on top of the recipe)
VARIANTS: Dict[str, tuple] = {
    "cls": ("CLS read-out (DINO's baseline)", ["--readout", "cls"]),
    "sparo": ("SPARO, L=64, V=64 (default)", ["--readout", "sparo"]),
    "sparo_global": ("SPARO, --sparo_norm global", ["--readout", "sparo", "--sparo_norm", "global"]),
    "sparo_keep_all": ("SPARO, every block kept (none replaced)", ["--readout", "sparo", "--sparo_keep_all_blocks", "true"]),
    "sparo_L16_V256": ("SPARO, L=16, V=256", ["--readout", "sparo", "--sparo_slots", "16", "--sparo_dim", "256"]),
    "sparo_L128_V32": ("SPARO, L=128, V=32", ["--readout", "sparo", "--sparo_slots", "128", "--sparo_dim", "32"]),
}
SEEDED = ("cls", "sparo")  # the head-to-head pair, run with every seed; the ablations use the first


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SPARO vs CLS quality benchmark", add_help=False)
    parser.add_argument("--quick", action="store_true",
                        help="The same pipeline at a small size (CLS and SPARO, one seed, fewer "
                             "images): minutes on 2 CPU cores (RESULTS.md). Flags given explicitly win.")
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "quality"),
                        help="Where checkpoints, features, logs and the results go (rerun to resume).")
    parser.add_argument("--eval_split", default="test", choices=("test", "heldout"),
                        help="test: the official test split; heldout: training images 50000 on "
                             "(for tuning the recipe without looking at the test split).")
    parser.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS),
                        help="Variants to run (default: all; --quick: cls sparo).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="Seeds of the CLS-vs-SPARO pair (default 0 1; --quick: 0). The "
                             "other variants run with the first seed only.")
    parser.add_argument("--recipe", default=str(RECIPE),
                        help="Pre-training config (main_dino_sparo.py --config) shared by all variants.")
    parser.add_argument("--linear_config", default=str(LINEAR),
                        help="Linear-probe config (eval_linear.py --config), the same for every "
                             "variant (eval_linear scales SPARO encodings to the unit coordinates "
                             "of CLS features, so one learning rate serves both).")
    parser.add_argument("--pretrain_subset", type=int, default=None,
                        help="Pre-train on the first N training images (default: the recipe's subset).")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Pre-training epochs (default: the recipe's).")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                        help="Further main_dino_sparo.py flags for every variant (last on the line).")
    parser.add_argument("--bank_size", type=int, default=None,
                        help="k-NN bank / linear-probe training images: the first N of the training "
                             "split (default 60000, the whole split, as in DINO's k-NN protocol and "
                             "the raw-pixel floor; --quick 10000).")
    parser.add_argument("--test_size", type=int, default=None,
                        help="Test images: the first N of the official test split, or of the "
                             "held-out images (default 10000, all; --quick 2000).")
    parser.add_argument("--select_slots", nargs="+", type=int, default=None,
                        help="Slot counts K reported with greedy selection (default 1 4 16; "
                             "--quick 4). Greedy selection runs once for the largest K; smaller K "
                             "are its first K picks, the same slots --select_slots K would give.")
    parser.add_argument("--untrained", default=True, type=utils.bool_flag,
                        help="Also evaluate every variant's network untrained (randomly "
                             "initialised): k-NN, and the linear probe unless --linear false.")
    parser.add_argument("--linear", default=True, type=utils.bool_flag,
                        help="Run the linear probes (the slowest evaluation).")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the subprocesses (default: the number of cores).")
    parser.add_argument("--jobs", type=int, default=None,
                        help="Pre-training runs at once, sharing the threads (default: one per "
                             "core on a CPU-only machine, one on a GPU). On a small CPU, two "
                             "1-thread runs train more images per second together than one "
                             "2-thread run: each spends part of its time on single-threaded "
                             "data augmentation.")
    return parser


# --quick: two epochs over a third of the images, enough for both read-outs to gain a few
# points over their untrained networks in minutes on 2 CPU cores.
QUICK_DEFAULTS = dict(variants=["cls", "sparo"], seeds=[0], bank_size=10000, test_size=2000,
                      select_slots=[4], pretrain_subset=20000, epochs=2)
FULL_DEFAULTS = dict(variants=list(VARIANTS), seeds=[0, 1], bank_size=None, test_size=10000,
                     select_slots=[1, 4, 16], pretrain_subset=None, epochs=None)


def resolve_defaults(args: argparse.Namespace) -> None:
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # The whole training split is the bank (heldout: all of it before the held-out images).
    available = HELDOUT_START if args.eval_split == "heldout" else 60000
    args.bank_size = args.bank_size or available
    args.variants = [v for v in VARIANTS if v in args.variants]  # table order
    recipe = load_yaml(args.recipe)
    if args.pretrain_subset is None:
        # a recipe that pre-trains on every image (subset 0) uses every image it may see
        args.pretrain_subset = int(recipe.get("subset", 0)) or available
    args.epochs = args.epochs if args.epochs is not None else int(recipe["epochs"])
    check_args(args)


def check_args(args: argparse.Namespace) -> None:
    if args.eval_split == "heldout":
        if not 0 < args.pretrain_subset <= HELDOUT_START:
            raise utils.UserError(f"--eval_split heldout needs --pretrain_subset between 1 and "
                                  f"{HELDOUT_START}, so that the held-out images are never pre-trained on")
        if args.test_size > 60000 - HELDOUT_START:
            raise utils.UserError(f"--test_size {args.test_size}: only {60000 - HELDOUT_START} "
                                  f"held-out training images exist")
    if args.bank_size < 20 or args.bank_size > (HELDOUT_START if args.eval_split == "heldout" else 60000):
        raise utils.UserError(f"--bank_size {args.bank_size} is out of range")
    if not 1 <= args.test_size <= 10000:
        raise utils.UserError(f"--test_size must lie between 1 and 10000, got {args.test_size}")
    if any(k < 1 for k in args.select_slots):
        raise utils.UserError("--select_slots values must be positive")
    if args.epochs < 1:
        raise utils.UserError("--epochs must be at least 1")


def load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise utils.UserError(f"cannot read {path}: {error.strerror}") from error


# ============================================================================= data
class EvalData:
    """Where the evaluation scripts read the bank and the test images: --data_path plus flags."""

    def __init__(self, name: str, data_path: str, flags: Sequence[str] = ()) -> None:
        self.name, self.data_path, self.flags = name, data_path, list(flags)

    def args(self) -> List[str]:
        return ["--data_path", self.data_path, *self.flags]


def evaluation_data(root: Path, bank_size: int, eval_split: str, test_size: int) -> EvalData:
    """The test split is the built-in data set's (first images of each split); the held-out
    split mixes training images into the test set, so it is exported as ImageFolders."""
    if eval_split == "test":
        return EvalData(f"fmnist_bank{bank_size}_test{test_size}", "fashion_mnist",
                        ["--train_subset", str(bank_size), "--test_subset", str(test_size)])
    folder = export_image_folders(root, bank_size, eval_split, test_size)
    return EvalData(folder.name, str(folder))


def export_image_folders(root: Path, bank_size: int, eval_split: str, test_size: int) -> Path:
    """DATA/train (the k-NN bank / linear training images) and DATA/val (the test images) as
    grey PNG ImageFolders with class folders 0..9, written once."""
    folder = root / f"fmnist_bank{bank_size}_{eval_split}{test_size}"
    done = folder / "done.json"
    if done.exists():
        return folder
    from PIL import Image

    train_images, train_labels = datasets.load_fashion_mnist("train")
    if eval_split == "test":
        test_images, test_labels = datasets.load_fashion_mnist("test")
        test_index = range(test_size)
    else:
        test_images, test_labels = train_images, train_labels
        test_index = range(HELDOUT_START, HELDOUT_START + test_size)
    for split, images, labels, index in (("train", train_images, train_labels, range(bank_size)),
                                         ("val", test_images, test_labels, test_index)):
        for label in range(10):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
        for i in index:
            Image.fromarray(images[i], mode="L").save(folder / split / str(int(labels[i])) / f"{i:05d}.png")
    done.write_text(json.dumps(dict(bank=[0, bank_size], eval_split=eval_split,
                                    test=[test_index.start, test_index.stop])) + "\n")
    return folder


def raw_pixel_floor(bank_size: int, eval_split: str, test_size: int) -> Dict[str, Any]:
    """Weighted k-NN on raw pixels (L2-normalised, cosine), with knn.py's k-NN code:
    on the same bank as the networks, and on the whole 60k training split."""
    train_images, train_labels = datasets.load_fashion_mnist("train")
    if eval_split == "test":
        test_images, test_labels = datasets.load_fashion_mnist("test")
        test_images, test_labels = test_images[:test_size], test_labels[:test_size]
        full_bank = len(train_images)
    else:
        test_images = train_images[HELDOUT_START:HELDOUT_START + test_size]
        test_labels = train_labels[HELDOUT_START:HELDOUT_START + test_size]
        full_bank = HELDOUT_START
    pixels = lambda x: F.normalize(torch.tensor(x.reshape(len(x), -1), dtype=torch.float32), dim=1)  # noqa: E731
    bank, test = pixels(train_images[:full_bank]), pixels(test_images)
    bank_labels, test_labels_t = torch.tensor(train_labels[:full_bank].astype(np.int64)), \
        torch.tensor(test_labels.astype(np.int64))
    result = {}
    for name, size in (("same_bank", bank_size), ("full_bank", full_bank)):
        votes = knn.knn_classify(bank[:size], bank_labels[:size], test, (20,), 0.07)
        top1, top5 = knn.knn_accuracy(votes, test_labels_t)[20]
        result[name] = dict(bank_size=size, top1=top1, top5=top5)
    return result


def variant_model_config(name: str, recipe: str, train_args: Sequence[str] = ()) -> Dict[str, Any]:
    """The backbone configuration variant `name` pre-trains (recipe + its flags + --train_args),
    read by main_dino_sparo.py's own parser, so that its untrained network is the same model."""
    import main_dino_sparo

    parser = argparse.ArgumentParser("SPARO-DINO", parents=[main_dino_sparo.get_args_parser()])
    args = utils.parse_args_with_config(parser, ["--config", recipe, *VARIANTS[name][1], *train_args])
    return vits.BackboneConfig.from_args(args).to_dict()


def save_untrained(path: Path, config: Dict[str, Any], seed: int) -> None:
    """A randomly initialised backbone (DINO's initialisation) saved like a training checkpoint,
    for the untrained-network evaluations."""
    if path.exists():
        return
    utils.fix_random_seeds(seed)
    model = vits.BackboneConfig.from_dict(config).build()
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_save(dict(teacher=model.state_dict(), model_config=config), path)


# ======================================================================== subprocesses
def run_logged(command: List[str], log: Path, threads: int) -> float:
    """Run a repository script, its output going to `log`; returns the wall time in seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(command)}  > {log}", flush=True)
    start = time.time()
    with open(log, "w") as handle:
        process = subprocess.run([sys.executable, *command], cwd=REPO, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise utils.UserError(f"{command[0]} failed with exit code {process.returncode} "
                              f"(log: {log}):\n{tail}")
    return seconds


def cached_step(path: Path, compute) -> Dict[str, Any]:
    """The JSON result of a step: read from `path` if a previous run finished it."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return result


def pretrain_all(args: argparse.Namespace, out: Path) -> Dict[tuple, Dict[str, Any]]:
    """Every (variant, seed) pre-training run, --jobs at a time; results by (name, seed)."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [(name, seed) for name in args.variants
            for seed in (args.seeds if name in SEEDED else args.seeds[:1])]
    threads = max(1, args.threads // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {run: pool.submit(pretrain, args, *run, out, threads) for run in runs}
        return {run: future.result() for run, future in futures.items()}


def pretrain(args: argparse.Namespace, name: str, seed: int, out: Path, threads: int) -> Dict[str, Any]:
    run_dir = out / "pretrain" / f"{name}_seed{seed}"
    command = ["main_dino_sparo.py", "--config", args.recipe, *VARIANTS[name][1],
               "--subset", str(args.pretrain_subset), "--epochs", str(args.epochs),
               "--seed", str(seed), "--output_dir", str(run_dir), *args.train_args]

    def compute() -> Dict[str, Any]:
        seconds = run_logged(command, run_dir / "stdout.log", threads)
        history = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.strip()]
        result = dict(command=" ".join(["python", *command]), seconds=seconds, train_log=history,
                      checkpoint=str(run_dir / "checkpoint.pth"))
        if all("epoch_seconds" in entry for entry in history):
            # the whole run's training time, also when this command only resumed it
            result["training_seconds"] = sum(entry["epoch_seconds"] for entry in history)
        return result
    return cached_step(run_dir / "pretrain.json", compute)


def knn_eval(args: argparse.Namespace, weights: str, data: EvalData, tag: Path,
             extra: Sequence[str] = ()) -> Dict[str, Any]:
    """eval_knn.py on the evaluation data (extra: e.g. --dump_features, --load_features)."""
    command = ["eval_knn.py", "--pretrained_weights", weights, *data.args(),
               "--resize_size", str(args.resize_size), "--nb_knn",
               *[str(k) for k in (10, 20, 100, 200) if k <= args.bank_size],
               "--num_workers", "0", "--output_json", str(tag / "knn.json"), *extra]

    def compute() -> Dict[str, Any]:
        seconds = run_logged(command, tag / "knn.log", args.threads)
        result = json.loads((tag / "knn.json").read_text())
        return dict(command=" ".join(["python", *command]), seconds=seconds, result=result)
    return cached_step(tag / "knn_step.json", compute)


def linear_eval(args: argparse.Namespace, weights: str, data: EvalData, tag: Path) -> Dict[str, Any]:
    command = ["eval_linear.py", "--config", args.linear_config, "--pretrained_weights", weights,
               *data.args(), "--resize_size", str(args.resize_size),
               "--num_workers", "0", "--output_dir", str(tag / "linear"),
               "--output_json", str(tag / "linear.json")]

    def compute() -> Dict[str, Any]:
        seconds = run_logged(command, tag / "linear.log", args.threads)
        result = json.loads((tag / "linear.json").read_text())
        return dict(command=" ".join(["python", *command]), seconds=seconds, result=result)
    return cached_step(tag / "linear_step.json", compute)


def slot_selection(args: argparse.Namespace, features: Path, tag: Path) -> Dict[str, Any]:
    """Greedy selection of max(K) slots on the training bank, then the test k-NN of the first K
    picks for each K, and of the first K slots by index (an unselected subset) for contrast."""
    largest = max(args.select_slots)
    dumped = EvalData(features.name, str(features))  # --load_features reads no images
    selected = knn_eval(args, "", dumped, tag / f"select{largest}",
                        ["--load_features", str(features), "--select_slots", str(largest)])
    order = selected["result"]["selected_slots"]
    rows = {}
    for k in sorted(set(args.select_slots)):
        picked = knn_eval(args, "", dumped, tag / f"greedy{k}",
                          ["--load_features", str(features), "--slots", ",".join(map(str, order[:k]))])
        first = knn_eval(args, "", dumped, tag / f"first{k}",
                         ["--load_features", str(features), "--slots", ",".join(map(str, range(k)))])
        rows[str(k)] = dict(slots=order[:k], greedy=top1_of(picked), first_k=top1_of(first),
                            heldout_score=selected["result"]["selection_scores"][k - 1])
    return dict(order=order, by_k=rows, seconds=selected["seconds"])


def top1_of(step: Dict[str, Any], k: int = 20) -> float:
    return float(step["result"]["knn"][str(k)]["top1"])


def linear_top1(step: Dict[str, Any]) -> float:
    """The last epoch's test accuracy (not DINO's best-over-epochs, which peeks at the test set)."""
    return float(step["result"]["last"]["acc1"])


# ============================================================================ table
def mean_spread(values: List[float]) -> Dict[str, Any]:
    return dict(values=values, mean=float(np.mean(values)),
                spread=float(np.max(values) - np.min(values)) if len(values) > 1 else None)


def fmt(summary: Dict[str, Any]) -> str:
    if summary is None:
        return "-"
    if summary["spread"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['spread'] / 2:.2f} ({', '.join(f'{v:.2f}' for v in summary['values'])})"


def write_tables(out: Path, results: Dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"Evaluation: {results['setup']['evaluation']}", "",
             "| variant | seeds | k-NN top-1 (k=20) | linear top-1 | untrained: k-NN | untrained: linear "
             "| pre-training time |", "|---|---|---|---|---|---|---|"]
    floor = results["raw_pixels"]
    banks = [("same", floor["same_bank"]), ("whole", floor["full_bank"])]
    if floor["same_bank"]["bank_size"] == floor["full_bank"]["bank_size"]:
        banks = banks[1:]  # the bank is the whole training split: one floor, not two equal rows
    for which, bank in banks:
        lines.append(f"| raw pixels, {which} {bank['bank_size']}-image bank | - | "
                     f"{bank['top1']:.2f} | - | - | - | - |")
    for name, row in results["variants"].items():
        minutes = np.mean(row["pretrain_seconds"]) / 60
        untrained = results.get("untrained", {}).get(name, {})
        untrained_cells = " | ".join(f"{untrained[key]:.2f}" if key in untrained else "-"
                                     for key in ("knn20", "linear"))
        lines.append(f"| {row['description']} | {','.join(map(str, row['seeds']))} | "
                     f"{fmt(row['knn20'])} | {fmt(row.get('linear'))} | {untrained_cells} | "
                     f"{minutes:.1f} min/run |")
    if results.get("slot_selection"):
        lines += ["", "SPARO slot selection (k-NN top-1, k=20, test; slots chosen greedily by "
                  "held-out 20-NN on the training bank):", "",
                  "| seed | K | greedy K slots | first K slots | all slots |", "|---|---|---|---|---|"]
        for seed, selection in results["slot_selection"].items():
            for k, row in selection["by_k"].items():
                lines.append(f"| {seed} | {k} | {row['greedy']:.2f} | {row['first_k']:.2f} | "
                             f"{selection['all_slots']:.2f} |")
    lines += ["", f"Total wall time: {results['seconds'] / 60:.1f} min."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


# ============================================================================= main
def run(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_yaml(args.recipe)
    args.resize_size = int(recipe["global_crops_size"])  # the whole 28-px image, no centre crop
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.jobs = args.jobs or (1 if torch.cuda.is_available() else args.threads)
    args.jobs = min(args.jobs, args.threads)
    evaluation = (f"k-NN bank and linear-probe training set: Fashion-MNIST training images "
                  f"0..{args.bank_size - 1}; test: " +
                  (f"official test split, images 0..{args.test_size - 1}" if args.eval_split == "test"
                   else f"held-out training images {HELDOUT_START}..{HELDOUT_START + args.test_size - 1}"))
    results: Dict[str, Any] = dict(setup=dict(
        evaluation=evaluation, eval_split=args.eval_split, bank_size=args.bank_size,
        test_size=args.test_size, recipe=recipe, recipe_file=os.path.relpath(args.recipe, REPO),
        pretrain_subset=args.pretrain_subset, epochs=args.epochs, train_args=args.train_args,
        linear_config=load_yaml(args.linear_config),
        machine=f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.jobs} "
                f"pre-training job(s) at once, torch {torch.__version__}, "
                f"{'bf16 autocast' if recipe.get('cpu_bf16') else 'fp32'} on CPU",
        quick=args.quick), variants={}, untrained={})

    # ============ preparing data ... ============
    data = evaluation_data(out / "data", args.bank_size, args.eval_split, args.test_size)
    results["raw_pixels"] = cached_step(out / "eval" / f"raw_pixels_{data.name}.json", lambda: raw_pixel_floor(
        args.bank_size, args.eval_split, args.test_size))
    print(f"Raw-pixel 20-NN: {results['raw_pixels']['same_bank']['top1']:.2f} (same bank), "
          f"{results['raw_pixels']['full_bank']['top1']:.2f} (whole bank)", flush=True)
    eval_root = out / "eval" / data.name

    # ============ untrained networks ... ============
    # Each variant's own architecture, randomly initialised: how much of its figures the
    # architecture gives before any training.
    if args.untrained:
        for name in args.variants:
            weights = out / "untrained" / f"{name}_seed{args.seeds[0]}.pth"
            config = variant_model_config(name, args.recipe, args.train_args)
            save_untrained(weights, config, args.seeds[0])
            tag = eval_root / f"untrained_{name}"
            row = dict(seed=args.seeds[0], knn20=top1_of(knn_eval(args, str(weights), data, tag)))
            if args.linear:
                row["linear"] = linear_top1(linear_eval(args, str(weights), data, tag))
            results["untrained"][name] = row

    # ============ pre-training every variant and seed ... ============
    trained_runs = pretrain_all(args, out)

    # ============ evaluating each variant ... ============
    slot_selection_results = {}
    for name in args.variants:
        seeds = args.seeds if name in SEEDED else args.seeds[:1]
        row: Dict[str, Any] = dict(description=VARIANTS[name][0], seeds=seeds, pretrain_seconds=[],
                                   runs={})
        knn, linear = [], []
        for seed in seeds:
            trained = trained_runs[(name, seed)]
            tag = eval_root / f"{name}_seed{seed}"
            select = name == "sparo" and bool(args.select_slots)
            # only slot selection reads the features again (60k x 4096 floats are 1 GB)
            knn_step = knn_eval(args, trained["checkpoint"], data, tag,
                                ["--dump_features", str(tag / "features")] if select else [])
            run_result = dict(pretrain=trained, knn=knn_step)
            knn.append(top1_of(knn_step))
            if args.linear:
                run_result["linear"] = linear_eval(args, trained["checkpoint"], data, tag)
                linear.append(linear_top1(run_result["linear"]))
            if select:
                selection = slot_selection(args, tag / "features", tag / "slots")
                selection["all_slots"] = top1_of(knn_step)
                slot_selection_results[str(seed)] = selection
            row["pretrain_seconds"].append(trained.get("training_seconds", trained["seconds"]))
            row["runs"][str(seed)] = run_result
        row["knn20"] = mean_spread(knn)
        row["linear"] = mean_spread(linear) if linear else None
        results["variants"][name] = row
        results["slot_selection"] = slot_selection_results
        results["seconds"] = time.time() - start
        write_tables(out, results)  # after every variant, so a long run shows progress
    results["seconds"] = time.time() - start
    write_tables(out, results)
    print((out / "results.md").read_text())
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser("SPARO vs CLS quality benchmark", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    resolve_defaults(args)
    run(args)


if __name__ == "__main__":
    utils.run_main(main)
