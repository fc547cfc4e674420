"""Plot training runs side by side from their log.txt files (e.g. SPARO vs CLS).

    python plot_runs.py RUN_DIR [RUN_DIR ...] --output runs.png

Panels against epoch: loss, teacher entropy, learning rate, and k-NN top-1 when a log has
`knn_top1` (--eval_every), starting at epoch -1 with the untrained network and with the raw
pixels' accuracy as a dashed line where the run measured them (knn_baselines.json). Each run
is labelled by its read-out and the flags in which the runs differ (run_folder.read_flags).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import config_files
import errors
import run_folder
import utils

PANELS = [("train_loss", "DINO loss"), ("train_teacher_entropy", "teacher entropy"),
          ("train_lr", "learning rate"), ("knn_top1", "k-NN top-1 (%), student dotted")]
# Flags that differ between any two runs without changing what is trained.
NOT_A_DIFFERENCE = {"output_dir", "dist_url", "local_rank", "num_workers", "print_freq",
                    "saveckp_freq", "config", "device", "tensorboard", "eval_student"}


def knn_points(log: List[Dict[str, Any]], baselines: Dict[str, Any],
               key: str = "knn_top1") -> List[Tuple[int, float]]:
    """(epoch, k-NN top-1): the untrained network at epoch -1 (student and teacher start equal),
    then each evaluated epoch; key "student_knn_top1" for the student (--eval_student)."""
    start = [(-1, baselines["untrained"]["knn_top1"])] if "untrained" in baselines else []
    points = [(e["epoch"], e[key]) for e in log if e.get(key) is not None and "epoch" in e]
    return start + points if points or key == "knn_top1" else []  # no student line without students


def run_labels(run_dirs: Sequence[Path], flags: Sequence[Dict[str, Any]]) -> List[str]:
    """'<readout> flag=value ...' with the flags whose values differ between the runs; the
    folder name is added where that leaves two runs with the same label."""
    keys = sorted({k for f in flags for k in f} - NOT_A_DIFFERENCE - {"readout"})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flags}) > 1]
    labels = [" ".join([str(f.get("readout", "?"))] + [f"{k}={f.get(k)}" for k in differing])
              for f in flags]
    return [f"{label} ({run_dir.name})" if labels.count(label) > 1 else label
            for label, run_dir in zip(labels, run_dirs)]


def plot(runs: Sequence[Tuple[str, List[Dict[str, Any]], Dict[str, Any]]], output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(key, title) for key, title in PANELS
              if any(key in entry for _, log, _ in runs for entry in log)]
    columns = 2 if len(panels) == 4 else len(panels)
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False,
                                 sharex=True)  # one epoch axis, also for a sparse k-NN curve
    for axis, (key, title) in zip(axes.flat, panels):
        for number, (label, log, baselines) in enumerate(runs):
            colour = f"C{number % 10}"  # one colour per run in every panel
            points = knn_points(log, baselines) if key == "knn_top1" else \
                [(e["epoch"], e[key]) for e in log if key in e and "epoch" in e]
            if points:
                epochs, values = zip(*points)
                axis.plot(epochs, values, marker="o", markersize=3, label=label, color=colour)
            student = knn_points(log, baselines, "student_knn_top1") if key == "knn_top1" else []
            if student:  # dotted, same colour: the student of the same run
                epochs, values = zip(*student)
                axis.plot(epochs, values, marker="x", markersize=3, linestyle=":", color=colour)
            if key == "knn_top1" and "raw pixels" in baselines:
                floor = axis.axhline(baselines["raw pixels"]["knn_top1"], color=colour,
                                     linestyle="--", linewidth=1)
                axis.legend(handles=[floor], labels=["raw pixels"], fontsize=8, loc="lower right")
        axis.set_title(title)
        if axis.get_subplotspec().is_last_row():
            axis.set_xlabel("epoch (-1: before training)" if key == "knn_top1" else "epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if key == "train_lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the loss panel has every run
    figure.legend(handles, labels, loc="upper center", ncol=min(len(runs), 3), fontsize=9,
                  frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.06 * ((len(runs) + 2) // 3) * 2 / rows))
    try:  # exactly the named file (savefig adds .png to a name without a suffix), whole or not at all
        with utils.replacing(output) as tmp:
            figure.savefig(tmp, dpi=120, format=output.suffix[1:].lower() or "png")
    finally:
        plt.close(figure)


def check_output_format(output: Path) -> None:
    """A suffix matplotlib cannot write (or a folder) is an error before anything is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    if output.is_dir():
        raise errors.UserError(f"--output {output} is a folder; name a file such as runs.png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if output.suffix and output.suffix[1:].lower() not in formats:
        raise errors.UserError(f"--output {output}: matplotlib cannot write {output.suffix} files; "
                               f"use one of {', '.join('.' + f for f in sorted(formats))}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot DINO training runs", add_help=True)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="Training --output_dir folders.")
    parser.add_argument("--output", default="runs.png", type=Path, help="The PNG to write.")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = config_files.parse_args_with_config(get_args_parser(), argv)
    logs = [run_folder.read_log(run_dir) for run_dir in args.run_dirs]  # every error before drawing
    if not args.output.parent.is_dir():
        raise errors.UserError(f"--output {args.output}: folder {args.output.parent} does not exist")
    check_output_format(args.output)
    labels = run_labels(args.run_dirs, [run_folder.read_flags(run_dir) for run_dir in args.run_dirs])
    plot(list(zip(labels, logs, [run_folder.read_baselines(run_dir) for run_dir in args.run_dirs])),
         args.output)
    print(f"Wrote {args.output} ({len(logs)} run{'s' if len(logs) > 1 else ''})")


if __name__ == "__main__":
    errors.run_main(main)
