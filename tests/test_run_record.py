"""The run record: config.yaml reproduces a run's flags, run_record.jsonl keeps every start."""
import argparse
import json

import torch
import yaml

import config_files
import main_dino_sparo as dino
import run_folder
import utils


def test_first_run_writes_config_that_reloads_to_the_same_flags(tiny_sparo_checkpoint):
    out = tiny_sparo_checkpoint.parent
    saved_args = torch.load(tiny_sparo_checkpoint, map_location="cpu", weights_only=True)["args"]
    parser = argparse.ArgumentParser("SPARO-DINO", parents=[dino.get_args_parser()])
    reloaded = vars(config_files.parse_args_with_config(parser, ["--config", str(out / "config.yaml")]))
    flags = yaml.safe_load((out / "config.yaml").read_text())
    assert flags["subset"] == 256 and flags["arch"] == "vit_tiny" and flags["device"] == "cpu"
    # every flag of the run, as the checkpoint saved it, comes back from --config
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            assert action.dest in flags, action.dest
            assert utils.plain(reloaded[action.dest]) == saved_args[action.dest], action.dest

    [record] = run_folder.read_records(out)
    assert record["start_epoch"] == 0 and record["world_size"] == 1
    assert record["torch"] == torch.__version__ and record["flags"] == flags
    assert len(record["git_commit"] or "") == 40 and isinstance(record["git_dirty"], bool)
    assert record["flags_changed"] == {}


def test_resume_appends_and_keeps_the_first_record(tmp_path):
    parser = dino.get_args_parser()
    first = parser.parse_args(["--epochs", "1", "--output_dir", str(tmp_path)])
    first.device = torch.device("cpu")  # as init_distributed_mode leaves it
    run_folder.record_start(first, tmp_path, parser, 0)
    config = (tmp_path / "config.yaml").read_text()
    resumed = parser.parse_args(["--epochs", "3", "--output_dir", str(tmp_path)])
    resumed.device = torch.device("cpu")
    run_folder.record_start(resumed, tmp_path, parser, 1)

    assert (tmp_path / "config.yaml").read_text() == config  # the first start's flags
    lines = (tmp_path / "run_record.jsonl").read_text().splitlines()
    assert [json.loads(line)["start_epoch"] for line in lines] == [0, 1]
    assert json.loads(lines[0])["flags"]["epochs"] == 1
    assert json.loads(lines[1])["flags_changed"] == {"epochs": 3}
