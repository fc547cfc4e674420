"""Does SPARO beat the CLS read-out? A small, reproducible DINO experiment on Fashion-MNIST.

    python bench/quality.py                        # the full table (about 2 hours on 2 CPU cores: RESULTS.md)
    python bench/quality.py --quick                # the same pipeline, small (minutes)
    python bench/quality.py --eval_split heldout    # for tuning: never touches the test split

Four read-outs, each pre-trained by the real command-line script (main_dino_sparo.py, in a
subprocess) with the same small-data recipe (configs/quality/recipe_cpu.yaml) and the same budget
(images, epochs, crops, batch): CLS (DINO's baseline) and SPARO with every seed, and two
controls with the first two: gap (mean patch token: pooling without slots) and cls_proj (the
CLS token projected to SPARO's width L*V: width without slots). Each network is evaluated by
the real eval_knn.py (weighted 20-NN, T=0.07, cosine) and eval_linear.py (its learning-rate
grid on frozen features, the head chosen on held-out training images). Next to them: the
raw-pixel k-NN floor (computed with knn.py's k-NN code on the raw 28x28 pixels) and each
variant's network untrained (randomly initialised), to tell what the architecture gives from
what pre-training adds. Optionally (--select_slots K ...), greedy SPARO slot selection
(eval_knn.py --select_slots, scored on a held-out part of the training bank).

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
import os
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
import config_files  # noqa: E402
import datasets  # noqa: E402
import devices  # noqa: E402
import errors  # noqa: E402
import knn  # noqa: E402
import main_dino_sparo  # noqa: E402
import run_folder  # noqa: E402
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402

RECIPE = REPO / "configs" / "quality" / "recipe_cpu.yaml"
LINEAR = REPO / "configs" / "quality" / "linear.yaml"
HELDOUT_START = 50000  # training images from here on are never pre-trained on (tuning split)

# name -> (what it is, extra pre-training flags on top of the recipe)
VARIANTS: Dict[str, tuple] = {
    "cls": ("CLS read-out (DINO's baseline)", ["--readout", "cls"]),
    "gap": ("control: mean patch token (gap)", ["--readout", "gap"]),
    "cls_proj": ("control: CLS projected to 4,096 (cls_proj)", ["--readout", "cls_proj"]),
    "sparo": ("SPARO, L=64, V=64 (default)", ["--readout", "sparo"]),
    "sparo_global": ("SPARO, --sparo_norm global", ["--readout", "sparo", "--sparo_norm", "global"]),
    "sparo_keep_all": ("SPARO, every block kept (none replaced)", ["--readout", "sparo", "--sparo_keep_all_blocks", "true"]),
    "sparo_L16_V256": ("SPARO, L=16, V=256", ["--readout", "sparo", "--sparo_slots", "16", "--sparo_dim", "256"]),
    "sparo_L128_V32": ("SPARO, L=128, V=32", ["--readout", "sparo", "--sparo_slots", "128", "--sparo_dim", "32"]),
    "sparo_query_lr10": ("SPARO, slot queries at 10x the learning rate",
                         ["--readout", "sparo", "--sparo_query_lr_mult", "10"]),
}
SEEDED = ("cls", "sparo")  # the head-to-head pair, run with every seed
CONTROLS = ("gap", "cls_proj")  # run with the first --control_seeds seeds; the ablations with the first
TABLE = ("cls", "gap", "cls_proj", "sparo")  # the default variants


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
                        help="Variants to run (default: cls gap cls_proj sparo; the SPARO "
                             "ablations sparo_global, sparo_keep_all, sparo_L16_V256 and "
                             "sparo_L128_V32, and sparo_query_lr10 on request).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="Seeds of the CLS-vs-SPARO pair (default 0 1; --quick: 0). The "
                             "controls run with the first --control_seeds of them, the ablations "
                             "with the first.")
    parser.add_argument("--control_seeds", type=int, default=1,
                        help="How many of --seeds the controls gap and cls_proj run with.")
    parser.add_argument("--recipe", default=str(RECIPE),
                        help="Pre-training config (main_dino_sparo.py --config) shared by all variants.")
    parser.add_argument("--linear_config", default=str(LINEAR),
                        help="Linear-probe config (eval_linear.py --config), the same for every "
                             "variant: its learning-rate grid picks each network's rate (and "
                             "CLS feature variant) on held-out training images.")
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
    parser.add_argument("--select_slots", nargs="*", type=int, default=[],
                        help="Slot counts K reported with greedy SPARO slot selection (none by "
                             "default; RESULTS.md's earlier table used 1 4 16). Greedy selection "
                             "runs once for the largest K; smaller K are its first K picks, the "
                             "same slots --select_slots K would give.")
    parser.add_argument("--untrained", default=True, type=utils.bool_flag,
                        help="Also evaluate every variant's network untrained (randomly "
                             "initialised): k-NN, and the linear probe unless --linear false.")
    parser.add_argument("--linear", default=True, type=utils.bool_flag,
                        help="Run the linear probes (the slowest evaluation).")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the subprocesses (default: the number of cores).")
    parser.add_argument("--jobs", type=int, default=None,
                        help="Jobs (pre-training runs, evaluations) at once, sharing the threads "
                             "(default: one per core on a CPU-only machine, one on a GPU). On a "
                             "small CPU, two 1-thread jobs do more together than one 2-thread "
                             "job: pre-training spends part of its time on single-threaded data "
                             "augmentation, and small matrix products scale poorly over threads.")
    return parser


# The full table: CLS and SPARO with seeds 0 and 1, the controls with seed 0 (6 networks), each
# pre-trained on all 60,000 training images for 3 epochs (2,811 iterations: the recipe's), plus
# the 4 untrained ones, all evaluated on the whole 60k bank and 10k test split (about 2 h on
# 2 CPU cores: RESULTS.md). --quick: the same four read-outs, one seed, 10,000 images for two
# epochs, a 10k bank and 2k test images: about 8 minutes.
QUICK_DEFAULTS = dict(variants=list(TABLE), seeds=[0], bank_size=10000, test_size=2000,
                      pretrain_subset=10000, epochs=2)
FULL_DEFAULTS = dict(variants=list(TABLE), seeds=[0, 1], bank_size=None, test_size=10000,
                     pretrain_subset=None, epochs=None)


def resolve_defaults(args: argparse.Namespace) -> None:
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # The whole training split is the bank (heldout: all of it before the held-out images).
    available = HELDOUT_START if args.eval_split == "heldout" else 60000
    args.bank_size = args.bank_size or available
    args.variants = [v for v in VARIANTS if v in args.variants]  # table order
    recipe = config_files.read_yaml_mapping(args.recipe, "recipe")
    if args.pretrain_subset is None:
        # a recipe that pre-trains on every image (subset 0) uses every image it may see
        args.pretrain_subset = int(recipe.get("subset", 0)) or available
    args.epochs = args.epochs if args.epochs is not None else int(recipe["epochs"])
    check_args(args)


def check_args(args: argparse.Namespace) -> None:
    if args.eval_split == "heldout":
        if not 0 < args.pretrain_subset <= HELDOUT_START:
            raise errors.UserError(f"--eval_split heldout needs --pretrain_subset between 1 and "
                                   f"{HELDOUT_START}, so that the held-out images are never pre-trained on")
        if args.test_size > 60000 - HELDOUT_START:
            raise errors.UserError(f"--test_size {args.test_size}: only {60000 - HELDOUT_START} "
                                   f"held-out training images exist")
    if args.bank_size < 20 or args.bank_size > (HELDOUT_START if args.eval_split == "heldout" else 60000):
        raise errors.UserError(f"--bank_size {args.bank_size} is out of range")
    if not 1 <= args.test_size <= 10000:
        raise errors.UserError(f"--test_size must lie between 1 and 10000, got {args.test_size}")
    if args.select_slots and "sparo" not in args.variants:
        raise errors.UserError("--select_slots selects SPARO slots: add sparo to --variants")
    if args.control_seeds < 1:
        raise errors.UserError("--control_seeds must be at least 1")
    if any(k < 1 for k in args.select_slots):
        raise errors.UserError("--select_slots values must be positive")
    if args.epochs < 1:
        raise errors.UserError("--epochs must be at least 1")


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
    parser = argparse.ArgumentParser("SPARO-DINO", parents=[main_dino_sparo.get_args_parser()])
    args = config_files.parse_args_with_config(parser, ["--config", recipe, *VARIANTS[name][1], *train_args])
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
        raise errors.UserError(f"{command[0]} failed with exit code {process.returncode} "
                               f"(log: {log}):\n{tail}")
    return seconds


def cached_step(path: Path, compute) -> Dict[str, Any]:
    """The JSON result of a step: read from `path` if a previous run finished it."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def script_step(command: List[str], tag: Path, name: str, threads: int) -> Dict[str, Any]:
    """An evaluation script's run (TAG/NAME.log) and the results it wrote to TAG/NAME.json, cached
    in TAG/NAME_step.json."""
    def compute() -> Dict[str, Any]:
        seconds = run_logged(command, tag / f"{name}.log", threads)
        result = json.loads((tag / f"{name}.json").read_text())
        return dict(command=" ".join(["python", *command]), seconds=seconds, result=result)
    return cached_step(tag / f"{name}_step.json", compute)


def seeds_of(args: argparse.Namespace, name: str) -> List[int]:
    """The seeds variant `name` runs with: all for CLS and SPARO, --control_seeds for the
    controls, the first for the ablations."""
    if name in SEEDED:
        return list(args.seeds)
    return list(args.seeds[:args.control_seeds] if name in CONTROLS else args.seeds[:1])


def pretrain(args: argparse.Namespace, name: str, seed: int, out: Path, threads: int) -> Dict[str, Any]:
    run_dir = out / "pretrain" / f"{name}_seed{seed}"
    command = ["main_dino_sparo.py", "--config", args.recipe, *VARIANTS[name][1],
               "--subset", str(args.pretrain_subset), "--epochs", str(args.epochs),
               "--seed", str(seed), "--output_dir", str(run_dir), *args.train_args]

    def compute() -> Dict[str, Any]:
        seconds = run_logged(command, run_dir / "stdout.log", threads)
        history = run_folder.read_log(run_dir)
        result = dict(command=" ".join(["python", *command]), seconds=seconds, train_log=history,
                      checkpoint=str(run_dir / run_folder.CHECKPOINT))
        if all("epoch_seconds" in entry for entry in history):
            # the whole run's training time, also when this command only resumed it
            result["training_seconds"] = sum(entry["epoch_seconds"] for entry in history)
        return result
    return cached_step(run_dir / "pretrain.json", compute)


def knn_eval(args: argparse.Namespace, weights: str, data: EvalData, tag: Path,
             extra: Sequence[str] = (), threads: Optional[int] = None) -> Dict[str, Any]:
    """eval_knn.py on the evaluation data (extra: e.g. --dump_features, --load_features)."""
    command = ["eval_knn.py", "--pretrained_weights", weights, *data.args(),
               "--resize_size", str(args.resize_size), "--nb_knn",
               *[str(k) for k in (10, 20, 100, 200) if k <= args.bank_size],
               "--num_workers", "0", "--output_json", str(tag / "knn.json"), *extra]
    return script_step(command, tag, "knn", threads or args.threads)


def linear_eval(args: argparse.Namespace, weights: str, data: EvalData, tag: Path,
                threads: Optional[int] = None) -> Dict[str, Any]:
    command = ["eval_linear.py", "--config", args.linear_config, "--pretrained_weights", weights,
               *data.args(), "--resize_size", str(args.resize_size),
               "--num_workers", "0", "--output_dir", str(tag / "linear"),
               "--output_json", str(tag / "linear.json")]
    return script_step(command, tag, "linear", threads or args.threads)


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
    """The chosen head's test accuracy after the last epoch (not DINO's best-over-epochs, which
    peeks at the test set)."""
    return float(step["result"]["last"]["acc1"])


def chosen_probe(step: Dict[str, Any]) -> str:
    """The grid's chosen head in a few characters: its lr (for a batch of 256) and, for CLS,
    its DINO feature variant (last n blocks, +p: with the mean patch token)."""
    chosen = step["result"].get("chosen")
    if chosen is None:  # a single-head probe (--lr)
        return "-"
    variant = "" if chosen["n_last_blocks"] is None else \
        f" {chosen['n_last_blocks']}b{'+p' if chosen['avgpool'] else ''}"
    return f"{chosen['lr']:g}{variant}"


def evaluate_network(args: argparse.Namespace, weights: str, data: EvalData, tag: Path,
                     threads: int, dump_features: bool = False) -> Dict[str, Any]:
    """k-NN and (with --linear) the linear probe of one network, in one job lane."""
    knn_step = knn_eval(args, weights, data, tag,
                        ["--dump_features", str(tag / "features")] if dump_features else [], threads)
    result = dict(knn=knn_step, knn20=top1_of(knn_step))
    if args.linear:
        result["linear"] = linear_eval(args, weights, data, tag, threads)
        result["linear_top1"] = linear_top1(result["linear"])
        result["probe"] = chosen_probe(result["linear"])
    return result


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


def gains(values: List[float], untrained: Optional[float]) -> Optional[Dict[str, Any]]:
    """Each seed's figure minus its variant's untrained network's (same architecture, seed 0)."""
    return None if untrained is None or not values else mean_spread([v - untrained for v in values])


def signed(summary: Optional[Dict[str, Any]]) -> str:
    if summary is None:
        return "-"
    spread = "" if summary["spread"] is None else f" ± {summary['spread'] / 2:.2f}"
    return f"{summary['mean']:+.2f}{spread}"


COLUMNS = ("read-out", "seeds", "k-NN top-1 (k=20)", "untrained k-NN", "k-NN gain",
           "linear top-1 (lr grid)", "untrained linear", "linear gain", "chosen probe",
           "pre-training")


def write_tables(out: Path, results: Dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"Evaluation: {results['setup']['evaluation']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    floor = results["raw_pixels"]
    banks = [("same", floor["same_bank"]), ("whole", floor["full_bank"])]
    if floor["same_bank"]["bank_size"] == floor["full_bank"]["bank_size"]:
        banks = banks[1:]  # the bank is the whole training split: one floor, not two equal rows
    for which, bank in banks:
        lines.append(f"| raw pixels, {which} {bank['bank_size']}-image bank | - | "
                     f"{bank['top1']:.2f} |" + " - |" * (len(COLUMNS) - 3))
    for name, row in results["variants"].items():
        untrained = results.get("untrained", {}).get(name, {})
        cell = lambda key: f"{untrained[key]:.2f}" if key in untrained else "-"  # noqa: E731
        minutes = np.mean(row["pretrain_seconds"]) / 60
        lines.append(" | ".join([
            f"| {row['description']}", ",".join(map(str, row["seeds"])),
            fmt(row["knn20"]), cell("knn20"), signed(row.get("knn20_gain")),
            fmt(row.get("linear")), cell("linear"), signed(row.get("linear_gain")),
            ", ".join(row.get("probes", [])) or "-", f"{minutes:.1f} min/run |"]))
    differences = results.get("difference_to_cls", {})
    if differences:
        lines += ["", "Difference to CLS (mean over seeds minus CLS's mean):", "",
                  "| read-out | k-NN | linear |", "|---|---|---|"]
        for name, diff in differences.items():
            lines.append(f"| {results['variants'][name]['description']} | {diff['knn20']:+.2f} | "
                         + (f"{diff['linear']:+.2f} |" if diff.get("linear") is not None else "- |"))
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


def summarise(name: str, seeds: List[int], runs: Dict[int, Dict[str, Any]],
              untrained: Dict[str, Any]) -> Dict[str, Any]:
    """A variant's table row from its runs (by seed): means, spreads, gains over untrained."""
    knn = [runs[seed]["knn20"] for seed in seeds]
    linear = [runs[seed]["linear_top1"] for seed in seeds if "linear_top1" in runs[seed]]
    return dict(description=VARIANTS[name][0], seeds=seeds,
                pretrain_seconds=[runs[s]["pretrain"].get("training_seconds", runs[s]["pretrain"]["seconds"])
                                  for s in seeds],
                knn20=mean_spread(knn), linear=mean_spread(linear) if linear else None,
                knn20_gain=gains(knn, untrained.get("knn20")),
                linear_gain=gains(linear, untrained.get("linear")),
                probes=[runs[s]["probe"] for s in seeds if "probe" in runs[s]],
                runs={str(seed): runs[seed] for seed in seeds})


def difference_to_cls(variants: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    if "cls" not in variants:
        return {}
    base = variants["cls"]
    mean = lambda row, key: row[key]["mean"] if row.get(key) else None  # noqa: E731
    return {name: dict(knn20=mean(row, "knn20") - mean(base, "knn20"),
                       linear=(mean(row, "linear") - mean(base, "linear")
                               if mean(row, "linear") is not None and mean(base, "linear") is not None else None))
            for name, row in variants.items() if name != "cls"}


# ============================================================================= main
def run(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = config_files.read_yaml_mapping(args.recipe, "recipe")
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
        linear_config=config_files.read_yaml_mapping(args.linear_config, "linear config"),
        machine=f"{devices.cpu_name()}, {args.threads} threads, {args.jobs} "
                f"jobs at once, torch {torch.__version__}, "
                f"{'bf16 autocast' if recipe.get('cpu_bf16') and not devices.cpu_bf16_shortfall() else 'fp32'} on CPU",
        quick=args.quick), variants={}, untrained={})

    # ============ preparing data ... ============
    data = evaluation_data(out / "data", args.bank_size, args.eval_split, args.test_size)
    results["raw_pixels"] = cached_step(out / "eval" / f"raw_pixels_{data.name}.json", lambda: raw_pixel_floor(
        args.bank_size, args.eval_split, args.test_size))
    print(f"Raw-pixel 20-NN: {results['raw_pixels']['same_bank']['top1']:.2f} (same bank), "
          f"{results['raw_pixels']['full_bank']['top1']:.2f} (whole bank)", flush=True)
    eval_root = out / "eval" / data.name

    # ============ untrained networks and pre-training, --jobs at a time ... ============
    # Untrained: each variant's own architecture, randomly initialised (seed of the first run):
    # how much of its figures the architecture gives before any training.
    from concurrent.futures import ThreadPoolExecutor

    lane = max(1, args.threads // args.jobs)  # threads per job
    runs = [(name, seed) for name in args.variants for seed in seeds_of(args, name)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        untrained = {name: pool.submit(evaluate_untrained, args, name, data, eval_root, out, lane)
                     for name in (args.variants if args.untrained else [])}
        pretrained = {run: pool.submit(pretrain, args, *run, out, lane) for run in runs}
        results["untrained"] = {name: future.result() for name, future in untrained.items()}
        trained_runs = {run: future.result() for run, future in pretrained.items()}

    # ============ evaluating every pre-trained network ... ============
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        evaluated = {run: pool.submit(evaluate_network, args, trained_runs[run]["checkpoint"], data,
                                      eval_root / f"{run[0]}_seed{run[1]}", lane,
                                      dump_features=run[0] == "sparo" and bool(args.select_slots))
                     for run in runs}
        for name in args.variants:
            seeds = seeds_of(args, name)
            by_seed = {seed: dict(evaluated[(name, seed)].result(), pretrain=trained_runs[(name, seed)])
                       for seed in seeds}
            results["variants"][name] = summarise(name, seeds, by_seed, results["untrained"].get(name, {}))
            results["seconds"] = time.time() - start
            write_tables(out, results)  # after every variant, so a long run shows progress
    results["difference_to_cls"] = difference_to_cls(results["variants"])

    # ============ SPARO slot selection (on request) ... ============
    if args.select_slots:
        results["slot_selection"] = {}
        for seed in seeds_of(args, "sparo"):
            tag = eval_root / f"sparo_seed{seed}"
            selection = slot_selection(args, tag / "features", tag / "slots")
            selection["all_slots"] = results["variants"]["sparo"]["runs"][str(seed)]["knn20"]
            results["slot_selection"][str(seed)] = selection
    results["seconds"] = time.time() - start
    write_tables(out, results)
    print((out / "results.md").read_text())
    return results


def evaluate_untrained(args: argparse.Namespace, name: str, data: EvalData, eval_root: Path,
                       out: Path, threads: int) -> Dict[str, Any]:
    seed = args.seeds[0]
    weights = out / "untrained" / f"{name}_seed{seed}.pth"
    save_untrained(weights, variant_model_config(name, args.recipe, args.train_args), seed)
    result = evaluate_network(args, str(weights), data, eval_root / f"untrained_{name}", threads)
    row = dict(seed=seed, knn20=result["knn20"])
    if args.linear:
        row.update(linear=result["linear_top1"], probe=result["probe"])
    return row


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser("SPARO vs CLS quality benchmark", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    resolve_defaults(args)
    run(args)


if __name__ == "__main__":
    errors.run_main(main)
