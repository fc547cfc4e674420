"""What a training run was: its flags and its environment, written to OUTPUT_DIR at every start.

- OUTPUT_DIR/config.yaml: every flag of the first start, resolved (config file, command line and
  defaults merged). `--config OUTPUT_DIR/config.yaml` reproduces the run (give another
  --output_dir to start afresh instead of resuming). Kept as written by the first start.
- OUTPUT_DIR/run_record.jsonl: one JSON line per start (the first and every resume): start time,
  epoch it starts from, git commit and dirty flag, torch/timm/CUDA versions, device names, world
  size, command line, every flag, and the flags that differ from config.yaml. Only appended to.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

import config_files
import devices
import utils

CONFIG_NAME = "config.yaml"
RECORD_NAME = "run_record.jsonl"
# Flags that describe how to read flags, not the run.
_NOT_RECORDED = {"help", "config"}


def resolved_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The value of every flag of `parser` in `args`, as plain YAML-able values.

    args.device holds the torch.device that init_distributed_mode chose; its type (cuda or cpu)
    is the flag value that reproduces it.
    """
    flags = {}
    for action in parser._actions:
        if action.dest in _NOT_RECORDED or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if isinstance(value, torch.device):
            value = value.type
        flags[action.dest] = utils.plain(value)
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
        import timm
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
    import yaml

    flags = resolved_flags(args, parser)
    config_path = output_dir / CONFIG_NAME
    if config_path.exists():  # hand-edited or damaged: an error before this start is recorded
        first = config_files.read_yaml_mapping(config_path, "the first start's flags (restore or delete it)")
    else:
        first = flags
        utils.atomic_write_text(config_path, "# Every flag of this run's first start; see "
                                "run_record.jsonl for each start.\n" + yaml.safe_dump(flags, sort_keys=True))
    record = dict(start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  start_epoch=int(start_epoch), world_size=int(getattr(args, "world_size", 1)),
                  **git_state(Path(__file__).resolve().parent), **environment(),
                  argv=list(sys.argv), flags=flags,
                  flags_changed={k: v for k, v in flags.items() if first.get(k) != v})
    utils.write_json_line(output_dir / RECORD_NAME, record)


def read_records(output_dir: Path) -> list:
    """Every start recorded in output_dir, oldest first."""
    path = output_dir / RECORD_NAME
    if not path.exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
