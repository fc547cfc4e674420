"""One failing rank ends every rank within seconds (failure_watch.FailureWatch), whatever launched
them: two plain processes joined in a gloo group, as srun starts them (no torchrun agent to
stop the others)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_TRAIN_ARGS, run_two_gloo_ranks

# Rank 1 runs out of memory in the DINO loss of its third step (mid-step: both forwards done,
# rank 0 goes on to the backward pass and waits in DDP's all-reduce). Its process then does not
# exit (an exit handler sleeps), as a rank can hang in NCCL's teardown, so that rank 0 cannot
# learn of the failure from a closed connection, as gloo would let it: only the watch can end it.
FAILING_RANK = """
import atexit, os, sys, time
import torch
import errors
import failure_watch
import main_dino_sparo
import utils

failed_at, steps = sys.argv.pop(1), [0]
loss_forward = main_dino_sparo.DINOLoss.forward

def forward_or_fail(self, *args, **kwargs):
    steps[0] += 1
    if os.environ["RANK"] == "1" and steps[0] == 3:
        atexit.register(time.sleep, 600)
        open(failed_at, "w").write(str(time.time()))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return loss_forward(self, *args, **kwargs)

main_dino_sparo.DINOLoss.forward = forward_or_fail
errors.run_main(main_dino_sparo.main)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_error_on_one_rank_ends_both_within_seconds(tmp_path):
    script, failed_at = tmp_path / "fail_on_rank1.py", tmp_path / "failed_at"
    script.write_text(FAILING_RANK)
    port = free_port()
    args = [*TINY_TRAIN_ARGS, "--arch", "vit_nano", "--subset", "128", "--batch_size_per_gpu", "16",
            "--epochs", "2", "--device", "cpu", "--output_dir", tmp_path / "run"]
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        ranks.append(subprocess.Popen([sys.executable, str(script), str(failed_at), *map(str, args)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs, ended = [], []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=90))
            ended.append(time.time())
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert failed_at.exists(), outputs[1][1][-3000:]  # the failure happened (mid-run) ...
    failed = float(failed_at.read_text())
    for rank, process in enumerate(ranks):
        assert process.returncode != 0, f"rank {rank} exited 0"
    # ... and both ranks were gone seconds later: rank 0 at its next poll of the store (2 s),
    # rank 1 by its deadline (10 s) although it hung in its exit; without the watch both wait
    # for the collective's timeout (30 min)
    assert max(ended) - failed < 25, [round(t - failed, 1) for t in ended]
    last_line = outputs[0][1].strip().splitlines()[-1]
    assert last_line == ("error: rank 1 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                         "2.00 GiB (injected); rank 0 stops too"), outputs[0][1][-3000:]
    assert "OutOfMemoryError: CUDA out of memory" in outputs[1][1]  # its own traceback


def _long_computation_on_rank_0(out, share):
    import datetime
    import json
    from pathlib import Path

    import torch.distributed as dist
    import errors
    import failure_watch
    import utils

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))

    def select():  # 3 s: longer than the group's collective timeout
        time.sleep(3)
        return {"slots": [5, 2, 7]}

    try:
        result = share(select)
        dist.barrier()  # the group still works afterwards
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        utils.cleanup_distributed()


def _share_by_broadcast(compute):
    """What eval_knn --select_slots did before: the others wait in a collective."""
    import torch.distributed as dist

    choice = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def test_a_computation_on_rank_0_may_outlast_the_collective_timeout(tmp_path):
    """utils.result_from_main: the other ranks wait on the store, so a long selection on rank 0
    (eval_knn --select_slots over ImageNet) is not cut off by the 30-min collective timeout;
    here a 3-s computation under a 2-s timeout."""
    import errors
    import failure_watch
    import utils

    run_two_gloo_ranks(_long_computation_on_rank_0, str(tmp_path), utils.result_from_main)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"slots": [5, 2, 7]}
    (tmp_path / "broadcast").mkdir()
    with pytest.raises(Exception, match="(?i)timed out|timeout"):  # a collective would time out
        run_two_gloo_ranks(_long_computation_on_rank_0, str(tmp_path / "broadcast"), _share_by_broadcast)
