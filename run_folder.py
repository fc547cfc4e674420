"""A training run's OUTPUT_DIR: the names of its files, its lock, which checkpoint a start resumes
from, and the records written there and read back by plot_runs.py and the k-NN summary.

- checkpoint.pth: the last finished epoch; checkpointNNNN.pth: kept every --saveckp_freq epochs.
- log.txt: one JSON line per finished epoch, rewritten on resume to match the checkpoint.
- config.yaml: every flag of the first start, resolved (config file, command line and defaults
  merged); `--config OUTPUT_DIR/config.yaml --output_dir NEW` reproduces the run. Never rewritten.
- run_record.jsonl: one JSON line per start (the first and every resume): start time and epoch,
  git commit and dirty flag, versions, devices, world size, command line, every flag, and the
  flags that differ from config.yaml. Only appended to.
- knn_baselines.json: --eval_every's figures of the untrained network (and raw pixels).
- tensorboard/: the curves (tensorboard_log.py); training.lock: held while a run writes here.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import config_files
import devices
import errors
import utils
import weight_files

CHECKPOINT = "checkpoint.pth"
NUMBERED_CHECKPOINT = re.compile(r"checkpoint(\d{4,})\.pth")  # numbered_checkpoint's names (epoch 10000 on: 5 digits)
LOG = "log.txt"
CONFIG = "config.yaml"
RECORD = "run_record.jsonl"
KNN_BASELINES = "knn_baselines.json"
TENSORBOARD = "tensorboard"
LOCK = "training.lock"
LOCK_WAIT_S = 15.0  # a requeued job may start while its pre-empted predecessor is exiting
NOT_RECORDED = {"help", "config"}  # flags that say how to read flags, not what the run is


def numbered_checkpoint(epoch: int) -> str:
    """The name of the checkpoint kept after `epoch` (0-based) by --saveckp_freq."""
    return f"checkpoint{epoch:04}.pth"


# ================================================================================ the lock
_held: Dict[str, Any] = {}  # resolved folder -> open lock file, for this process
_held_for_the_process = contextlib.ExitStack()


@contextlib.contextmanager
def locked(folder: str | Path, holder: str = "a training run") -> Iterator[None]:
    """Hold an exclusive lock on an output folder while the block runs, so that two runs never
    write into one folder; a folder held by another process is an error naming it. A folder this
    process holds already is not locked again.

    Rank 0 takes it: the other ranks of a run write nothing there, and ranks on other nodes
    would lock themselves out of a shared folder. flock locks die with their process, so a
    crashed run's lock is never stale; the file is removed at the end, and after a kill -9 it
    stays, holding the dead process's id, and is reused.
    """
    key = str(Path(folder).resolve())
    if key in _held:
        yield
        return
    _held[key] = _acquire(Path(folder), holder)
    try:
        yield
    finally:
        handle = _held.pop(key)
        # A folder gone read-only or removed keeps (or lost) the file, as after a kill -9: the
        # lock still dies with the handle, and the run's own error or success stands.
        with contextlib.suppress(OSError):
            Path(handle.name).unlink()
        handle.close()


def _acquire(folder: Path, holder: str) -> Any:
    path = folder / LOCK
    deadline = time.time() + LOCK_WAIT_S
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            held_by = handle.read().strip() or "another process"
            handle.close()
            if time.time() < deadline:
                time.sleep(0.5)
                continue
            raise errors.UserError(f"--output_dir {folder} is in use by {held_by} ({path}); wait for "
                                   f"that run to end or choose another --output_dir") from None
        # The holder may have removed the file between our open and our lock: then this lock
        # is on a deleted file and means nothing; take the new file's lock instead.
        if os.path.exists(path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder}, pid {os.getpid()} on {socket.gethostname()}, "
                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def lock_output_dir(folder: str | Path, holder: str) -> None:
    """`locked` until release_output_locks(), for a script that checks its folder in one
    function and works in others (eval_linear.py)."""
    _held_for_the_process.enter_context(locked(folder, holder))


def release_output_locks() -> None:
    """Release (and remove) the locks taken with lock_output_dir."""
    _held_for_the_process.close()


@contextlib.contextmanager
def opened(output_dir: Path) -> Iterator[None]:
    """Create OUTPUT_DIR (rank 0), check it is writable, hold its lock while the block runs and
    clear temporary files a killed run left there; every rank stops if rank 0 cannot."""
    with contextlib.ExitStack() as stack:
        error = None
        if utils.is_main_process():
            try:
                utils.ensure_output_dir(output_dir, "--output_dir")
                stack.enter_context(locked(output_dir))  # before anything in it is read or changed
                utils.remove_stale_temporary_files(output_dir)
            except errors.UserError as raised:
                error = raised
        utils.stop_together(error)
        yield


# ========================================================================= checkpoints
def resume_candidates(output_dir: str | Path) -> List[Path]:
    """The checkpoints a start would resume from, in the order tried: checkpoint.pth, then the
    numbered ones, newest first."""
    output_dir = Path(output_dir)
    numbered = sorted(((int(match[1]), path) for path in output_dir.glob("checkpoint*.pth")
                       if (match := NUMBERED_CHECKPOINT.fullmatch(path.name))), reverse=True)
    checkpoint = output_dir / CHECKPOINT
    return ([checkpoint] if checkpoint.exists() else []) + [path for _, path in numbered]


def find_resume_checkpoint(output_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The first readable training checkpoint of resume_candidates, loaded: what a start resumes
    from. None when there is no checkpoint; an error when there are only unreadable ones, so
    that a damaged run is never silently restarted from scratch over its files."""
    candidates = resume_candidates(output_dir)
    for path in candidates:
        try:
            checkpoint = weight_files.load_checkpoint(path)
        except errors.UserError as error:
            print(f"Skipping unreadable checkpoint: {error}")
            continue
        if {"student", "teacher", "epoch"} <= set(checkpoint):
            return path, checkpoint
        print(f"Skipping {path}: not a training checkpoint (no student/teacher/epoch)")
    if candidates:
        raise errors.UserError(f"{output_dir} holds checkpoints but none is readable "
                               f"({', '.join(p.name for p in candidates)}); move them away to start over")
    return None


def save_epoch(output_dir: Path, state: Dict[str, Any], saveckp_freq: int) -> None:
    """Rank 0: the checkpoint of a finished epoch (state["epoch"] epochs done), then its line
    in log.txt (state["train_log"][-1]); a numbered copy every saveckp_freq epochs."""
    if not utils.is_main_process():
        return
    utils.atomic_save(state, output_dir / CHECKPOINT)
    if saveckp_freq and state["epoch"] % saveckp_freq == 0:
        utils.atomic_save(state, output_dir / numbered_checkpoint(state["epoch"] - 1))
    utils.write_json_line(output_dir / LOG, state["train_log"][-1])


# ================================================================================ log.txt
def rewrite_log(output_dir: Path, history: List[Dict[str, Any]]) -> None:
    """Rank 0: make log.txt hold exactly the saved epochs' JSON lines (atomically), so that it
    tells the story of the checkpoint training continues from, even after a crash between the
    checkpoint and the log line. A new run creates it with its first epoch, so a run that
    fails before leaves no empty log behind."""
    path = output_dir / LOG
    lines = "".join(json.dumps(record) + "\n" for record in history)
    if not utils.is_main_process() or (path.exists() and path.read_text() == lines) or \
            (not lines and not path.exists()):
        return
    utils.atomic_write_text(path, lines)  # a full disk: one line naming log.txt, the old one kept


def saved_history(checkpoint: Dict[str, Any], output_dir: Path) -> List[Dict[str, Any]]:
    """The log of the epochs a checkpoint holds: its own train_log, or for one written without
    it (an older version's), log.txt's records before its epoch, so that the rewrite on resume
    never empties a log it cannot rebuild."""
    if "train_log" in checkpoint:
        return list(checkpoint["train_log"])
    path = output_dir / LOG
    if not path.exists() or not path.read_text().strip():
        return []
    epochs_done = int(checkpoint["epoch"])
    return [entry for entry in read_log(output_dir) if entry.get("epoch", -1) < epochs_done]


def read_log(run_dir: Path) -> List[Dict[str, Any]]:
    """The epochs of log.txt, or a UserError: no log, an empty one or a damaged line."""
    path = run_dir / LOG
    if not path.is_file():
        raise errors.UserError(f"{run_dir} has no {LOG}: not a training --output_dir, or no "
                               f"epoch has finished there yet")
    try:
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise errors.UserError(f"cannot read {path}: {errors.capped(str(error), 200)}") from error
    if not entries:
        raise errors.UserError(f"{path} is empty: no epoch has finished yet")
    if not all(isinstance(entry, dict) for entry in entries):
        raise errors.UserError(f"cannot read {path}: a line is not a JSON record of an epoch")
    return entries


# ============================================================= config.yaml and run_record
def resolved_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The value of every flag of `parser` in `args`, as plain YAML-able values. args.device
    holds the torch.device init_distributed_mode chose; its type is the flag that gives it."""
    flags = {}
    for action in parser._actions:
        if action.dest in NOT_RECORDED or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        flags[action.dest] = utils.plain(value.type if isinstance(value, torch.device) else value)
    return flags


def git_state(directory: Path) -> Dict[str, Any]:
    """The commit checked out in `directory` and whether tracked files differ from it;
    {"git_commit": None} outside a git repository or without git."""
    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *command], check=True, timeout=20,
                              capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    return {"git_commit": commit, "git_dirty": dirty}


def environment() -> Dict[str, Any]:
    """Versions and devices of this process (rank 0: its node's GPUs)."""
    try:
        import timm  # optional: only the timm entry points need it
        timm_version: Optional[str] = timm.__version__
    except ImportError:
        timm_version = None
    cuda = torch.cuda.is_available()
    return dict(python=platform.python_version(), torch=torch.__version__, timm=timm_version,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
                host=socket.gethostname(),
                devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if cuda else [devices.cpu_name()])


def record_start(args: argparse.Namespace, output_dir: Path, parser: argparse.ArgumentParser,
                 start_epoch: int) -> None:
    """On rank 0: write config.yaml on the first start and append this start to run_record.jsonl."""
    if not utils.is_main_process():
        return
    flags = resolved_flags(args, parser)
    config_path = output_dir / CONFIG
    if config_path.exists():  # hand-edited or damaged: an error before this start is recorded
        first = config_files.read_yaml_mapping(config_path, "the first start's flags (restore or delete it)")
    else:
        first = flags
        utils.atomic_write_text(config_path, f"# Every flag of this run's first start; see {RECORD} "
                                f"for each start.\n" + config_files.yaml_text(flags))
    record = dict(start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  start_epoch=int(start_epoch), world_size=int(getattr(args, "world_size", 1)),
                  **git_state(Path(__file__).resolve().parent), **environment(),
                  argv=list(sys.argv), flags=flags,
                  flags_changed={k: v for k, v in flags.items() if first.get(k) != v})
    utils.write_json_line(output_dir / RECORD, record)


def read_records(output_dir: Path) -> List[Dict[str, Any]]:
    """Every start recorded in output_dir, oldest first."""
    path = output_dir / RECORD
    if not path.exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_flags(run_dir: Path) -> Dict[str, Any]:
    """The run's flags: config.yaml, else the args in checkpoint.pth (runs older than the run
    record); {} when neither exists."""
    if (run_dir / CONFIG).is_file():
        return config_files.read_yaml_mapping(run_dir / CONFIG, "the run's flags")
    if (run_dir / CHECKPOINT).is_file():
        args = weight_files.load_checkpoint(run_dir / CHECKPOINT).get("args") or {}
        return dict(vars(args) if isinstance(args, argparse.Namespace) else args) \
            if isinstance(args, (dict, argparse.Namespace)) else {}
    return {}


# ===================================================================== knn_baselines.json
def write_baselines(output_dir: Path, baselines: Dict[str, Any]) -> None:
    if utils.is_main_process():
        utils.atomic_write_text(output_dir / KNN_BASELINES, json.dumps(baselines, indent=1))


def read_baselines(output_dir: Path) -> Dict[str, Any]:
    """knn_baselines.json ({name: {"knn_top1": ...}, "description": ...}), or {}; a damaged file
    is left out with a warning: it only adds figures to a summary or a plot, and must not fail
    a finished run."""
    path = Path(output_dir) / KNN_BASELINES
    if not path.is_file():
        return {}
    try:
        baselines = json.loads(path.read_text())
        if not isinstance(baselines, dict):
            raise ValueError(f"a JSON {type(baselines).__name__}, not an object")
        for name in ("raw pixels", "untrained"):
            if name in baselines and not isinstance(baselines[name]["knn_top1"], (int, float)):
                raise ValueError(f"{name}: a k-NN top-1 that is not a number")
        if not isinstance(baselines.get("description", ""), str):
            raise ValueError("a description that is not text")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        print(f"Warning: {path} left out, it cannot be read ({type(error).__name__}: "
              f"{errors.capped(str(error), 200)})", file=sys.stderr, flush=True)
        return {}
    return baselines
