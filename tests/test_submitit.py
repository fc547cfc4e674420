"""run_with_submitit.py: the requeue path, multi-task CPU jobs on submitit's local executor,
evaluation jobs and the Slurm request, all on real digits runs."""
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from submitit.core.utils import DelayedSubmission

import errors
import run_with_submitit
import weight_files
from helpers import REPO, TINY_TRAIN_ARGS, read_log

# TINY_TRAIN_ARGS on 64 images in batches of 16: 4 iterations per epoch for one task.
SMALL_TRAIN_ARGS = [*TINY_TRAIN_ARGS, "--subset", "64", "--batch_size_per_gpu", "16"]
LOCAL_CPU = ["--cluster", "local", "--ngpus", "0", "--nodes", "1"]
# One torch thread per task: the test machine's cores are shared.
JOB_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch(*args, timeout=600, env=None, cwd=REPO):
    process = subprocess.run([sys.executable, str(REPO / "run_with_submitit.py"), *map(str, args)],
                             cwd=cwd, env=env or JOB_ENV, capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    return process


@pytest.mark.slow
def test_a_job_launched_from_another_folder_runs(tmp_path):
    """The job's process starts outside the repository: nothing pickled with the job may need
    the project's modules before it puts the repository on sys.path."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process = launch(*LOCAL_CPU, *SMALL_TRAIN_ARGS, "--epochs", "1", "--output_dir", tmp_path / "run",
                     cwd=elsewhere)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert weight_files.load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1


def job_task_pids(folder):
    """Processes of submitit tasks whose log folder lies in `folder` (what Slurm would signal)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in argv and any(a.startswith(str(folder).encode()) for a in argv):
            pids.append(int(proc.name))
    return pids


def test_checkpoint_resubmits_the_same_job(tmp_path):
    """submitit calls checkpoint() on time-out/pre-emption: it must give a new job with the same
    arguments, whose output folder (%j filled in once) survives the pickle submitit writes."""
    launcher, job_args = run_with_submitit.parse_args(
        [*LOCAL_CPU, "--ntasks_per_node", "2", *SMALL_TRAIN_ARGS, "--epochs", "3",
         "--output_dir", str(tmp_path / "run_%j")])
    run_with_submitit.resolve_folders(launcher, job_args)
    job = run_with_submitit.SubmititJob("train", job_args, ngpus=0, threads=1)
    job.fix_output_dir("4242")  # what the job does when it first starts as job 4242
    assert job.job_args.output_dir == str(tmp_path / "run_4242")

    delayed = job.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.args == () and delayed.kwargs == {}
    resubmitted = delayed.function
    assert isinstance(resubmitted, run_with_submitit.SubmititJob) and resubmitted is not job
    assert vars(resubmitted.job_args) == vars(job.job_args)
    assert (resubmitted.job, resubmitted.ngpus, resubmitted.threads) == ("train", 0, 1)

    delayed.dump(tmp_path / "submitted.pkl")  # what submitit requeues
    reloaded = DelayedSubmission.load(tmp_path / "submitted.pkl").function
    assert vars(reloaded.job_args) == vars(job.job_args)
    reloaded.fix_output_dir("9999")  # a requeue under another id keeps the folder
    assert reloaded.job_args.output_dir == str(tmp_path / "run_4242")
    assert reloaded.job_args.epochs == 3 and reloaded.job_args.data_path == "digits"


@pytest.mark.slow
def test_preempted_local_job_requeues_and_resumes(tmp_path):
    """A real pre-emption: USR2 to the running task (as Slurm sends it) after the first epoch;
    the job requeues itself and the new run resumes from the saved epoch, in the same folder."""
    epochs = 3
    command = [sys.executable, str(REPO / "run_with_submitit.py"), *LOCAL_CPU, *SMALL_TRAIN_ARGS,
               "--epochs", epochs, "--output_dir", tmp_path / "run_%j"]
    launcher = subprocess.Popen(list(map(str, command)), cwd=REPO, env=JOB_ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not list(tmp_path.glob("run_[0-9]*/checkpoint.pth")):
            assert launcher.poll() is None, f"launcher ended early:\n{launcher.communicate()}"
            assert time.time() < deadline, "no checkpoint after the first epoch"
            time.sleep(0.2)
        output_dir = next(tmp_path.glob("run_[0-9]*"))
        pids = job_task_pids(tmp_path)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGUSR2)
        stdout, stderr = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)  # the launcher stops its local job
            launcher.communicate(timeout=60)
    assert launcher.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert re.fullmatch(r"run_\d+", output_dir.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [output_dir.name]  # no stray run_%j
    assert f"Requeuing the train job; it resumes from {output_dir}/checkpoint.pth" in stdout
    resumed = re.findall(r"Resuming from (\S+) at epoch (\d+)\.", stdout)
    assert len(resumed) == 1, stdout[-3000:]
    assert resumed[0][0] == str(output_dir / "checkpoint.pth")
    assert 1 <= int(resumed[0][1]) < epochs
    # Every epoch trained exactly once across the two runs, and training finished.
    assert [record["epoch"] for record in read_log(output_dir / "log.txt")] == list(range(epochs))
    assert weight_files.load_checkpoint(output_dir / "checkpoint.pth")["epoch"] == epochs
    assert f"finished: {output_dir}/checkpoint.pth" in stdout


@pytest.fixture(scope="module")
def two_task_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_tasks")
    process = launch(*LOCAL_CPU, "--ntasks_per_node", "2", *SMALL_TRAIN_ARGS, "--epochs", "1",
                     "--output_dir", out)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return out, process.stdout


@pytest.mark.slow
def test_local_job_with_two_cpu_tasks_trains(two_task_checkpoint):
    out, stdout = two_task_checkpoint
    checkpoint = weight_files.load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 1
    assert checkpoint["args"]["world_size"] == 2 and checkpoint["args"]["distributed"]
    assert checkpoint["args"]["device"] == "cpu"
    # 64 images over 2 processes in batches of 16: 2 iterations each (DistributedSampler).
    assert "Epoch: [0/1]  [1/2]" in stdout
    job_id = re.search(r"Submitted job_id: (\d+)", stdout).group(1)
    for task in (0, 1):
        assert (out / f"{job_id}_{task}_result.pkl").exists()  # both tasks ended normally
    assert "global_rank=1(2)" in (out / f"{job_id}_1_log.out").read_text()


@pytest.mark.slow
def test_knn_job_evaluates_the_two_task_checkpoint(two_task_checkpoint, tmp_path):
    if not (REPO / "eval_knn.py").exists():
        pytest.skip("eval_knn.py is not in this checkout")
    out, _ = two_task_checkpoint
    process = launch("--job", "knn", *LOCAL_CPU, "--shared_dir", tmp_path, "--pretrained_weights", out / "checkpoint.pth",
                     "--data_path", "digits", "--nb_knn", "10", "20", "--batch_size_per_gpu", "64",
                     "--num_workers", "0")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    found = re.findall(r"20-NN classifier result: Top1: ([\d.]+)", process.stdout)
    assert found, process.stdout[-3000:]
    # 10 balanced classes: chance is 10%; even 1 epoch of features separates digits far better.
    assert float(found[-1]) > 30.0
    assert "finished: {" in process.stdout and '"knn": {"10": {"top1"' in process.stdout
    assert [p.name for p in tmp_path.iterdir()] == [re.search(r"job_id: (\d+)", process.stdout).group(1)]


def test_slurm_request_matches_the_flags(tmp_path, monkeypatch, capsys):
    """The sbatch script submitit writes, captured by a stand-in sbatch (no Slurm here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture = tmp_path / "sbatch_script.sh"
    fakes = {"sbatch": f'#!/bin/sh\ncp "$1" {capture}\necho "Submitted batch job 4242"\n',
             "srun": "#!/bin/sh\nexit 0\n"}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_with_submitit.main(["--nodes", "2", "--ngpus", "8", "--timeout", "600", "--partition", "gpu",
                            "--use_volta32", "--comment", "deadline", "--arch", "vit_small",
                            "--data_path", "/data/imagenet/train", "--shared_dir", str(tmp_path / "shared")])
    stdout = capsys.readouterr().out
    assert "Submitted job_id: 4242" in stdout
    assert f"Output: {tmp_path}/shared/4242" in stdout
    script = capture.read_text()
    for line in ["--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10",
                 "--mem=320GB", "--time=600", "--partition=gpu", "--constraint=volta32gb",
                 "--comment=deadline", "--signal=USR2@120", "--job-name=sparo_dino_train",
                 f"--output={tmp_path}/shared/%j/%j_0_log.out"]:
        assert f"#SBATCH {line}\n" in script, f"{line} missing from:\n{script}"
    assert "srun --unbuffered" in script and "submitit.core._submit" in script

    # The pickled job carries the training flags and an absolute output folder with %j.
    pickled = next((tmp_path / "shared" / "4242").glob("*_submitted.pkl"))
    job = DelayedSubmission.load(pickled).function
    assert job.job_args.arch == "vit_small" and job.ngpus == 8 and job.threads == 10
    assert job.job_args.output_dir == f"{tmp_path}/shared/%j"


@pytest.mark.parametrize("argv, message", [
    (["--cluster", "local", "--nodes", "2", "--output_dir", "x"], "runs on this machine only"),
    (["--cluster", "local", "--ngpus", "0", "--nodes", "1"], "give --output_dir or --shared_dir"),
    (["--cluster", "debug", "--ngpus", "0", "--ntasks_per_node", "2", "--nodes", "1",
      "--output_dir", "x"], "single task"),
    (["--ngpus", "4", "--ntasks_per_node", "2", "--output_dir", "x"], "one task per GPU"),
    (["--cluster", "local", "--ngpus", "0", "--nodes", "1", "--output_dir", "x",
      "--patch_size", "16", "--global_crops_size", "20"], "not a multiple of --patch_size"),
])
def test_bad_requests_are_refused_before_submitting(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError, match=message):
        run_with_submitit.main(argv)
    assert not any(tmp_path.iterdir())  # nothing was submitted


@pytest.mark.parametrize("flag, value, message", [
    ("--nodes", "0", "must be a positive integer, got 0"), ("--ngpus", "-1", "must be 0 or more, got -1"),
    ("--ntasks_per_node", "0", "must be a positive integer, got 0"), ("--timeout", "0", "must be a positive integer"),
    ("--cpus_per_task", "0", "must be a positive integer"), ("--mem_per_gpu", "0", "must be a positive number")])
def test_launcher_resource_flags_are_checked_when_parsed(flag, value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_with_submitit.main(["--cluster", "local", "--output_dir", "x", flag, value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: argument {flag}: {message}" + (
        "" if message.endswith(value) else f", got {value}") + " (see --help)"
    assert not any(tmp_path.iterdir())


def test_flag_ranges_are_checked_by_the_launcher_too(tmp_path, monkeypatch, capsys):
    """The range rules live in the flags' argparse types, so the launcher gets them (zero crop
    sizes used to reach the job and come back as a garbled "did not finish" line)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_with_submitit.main(["--cluster", "local", "--ngpus", "0", "--nodes", "1", "--output_dir", "x",
                                "--global_crops_size", "0", "--local_crops_size", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: argument --global_crops_size: must be a positive "
                                               "integer, got 0 (see --help)")
    assert not any(tmp_path.iterdir())


def test_slurm_cluster_needs_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    with pytest.raises(errors.UserError, match="use --cluster local"):
        run_with_submitit.main(["--output_dir", str(tmp_path / "out")])


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the error on a machine without GPUs")
def test_local_gpus_must_exist(tmp_path):
    with pytest.raises(errors.UserError, match="0 CUDA GPU"):
        run_with_submitit.main(["--cluster", "local", "--ngpus", "1", "--nodes", "1",
                                "--output_dir", str(tmp_path)])


def test_config_file_sets_launcher_and_training_flags(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("cluster: local\nngpus: 0\nnodes: 1\nntasks_per_node: 2\n"
                      "arch: vit_tiny\npatch_size: 4\nepochs: 7\n")
    launcher, job_args = run_with_submitit.parse_args(
        ["--config", str(config), "--epochs", "9", "--output_dir", str(tmp_path / "out")])
    assert (launcher.cluster, launcher.ngpus, launcher.nodes, launcher.ntasks_per_node) == ("local", 0, 1, 2)
    assert (job_args.arch, job_args.patch_size, job_args.epochs) == ("vit_tiny", 4, 9)  # flags win
    # The job sees exactly the training script's arguments, nothing of the launcher's.
    import main_dino_sparo

    training_parser = main_dino_sparo.get_args_parser()
    assert set(vars(job_args)) == {a.dest for a in training_parser._actions}
