"""Run SPARO-DINO pre-training and its evaluations on a Slurm cluster (or on this machine)
through submitit, with jobs that survive time-outs and pre-emption.

    # ViT-S/16 SPARO on 2 nodes x 8 GPUs; everything of the run goes to /shared/runs/JOBID
    python run_with_submitit.py --nodes 2 --ngpus 8 --config configs/vits16_imagenet.yaml \\
        --data_path /path/to/imagenet/train --shared_dir /shared/runs
    # the same job on this machine, two CPU processes (gloo)
    python run_with_submitit.py --cluster local --ngpus 0 --ntasks_per_node 2 --nodes 1 \\
        --arch vit_tiny --patch_size 4 --data_path digits --epochs 1 --output_dir out
    # k-NN evaluation of a checkpoint, as a job
    python run_with_submitit.py --job knn --nodes 1 --ngpus 8 --shared_dir /shared/eval \\
        --pretrained_weights /shared/runs/123/checkpoint.pth --data_path /path/to/imagenet

Every flag of the job's script is accepted (main_dino_sparo.py for --job train, eval_knn.py
and eval_linear.py for knn and linear); `--job knn --help` lists them. Each task of the job
learns its rank, local rank, world size and the master address and port from submitit's job
environment; GPUs use NCCL, CPU tasks (--ngpus 0) gloo. Before Slurm's time limit, or when the
job is pre-empted, submitit signals the job (USR2); the job requeues itself with the same
arguments and resumes from OUTPUT_DIR/checkpoint.pth, losing only the current epoch.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import submitit

import config_files
import errors
import run_folder
import utils

REPO_DIR = Path(__file__).resolve().parent
CLUSTERS = ("slurm", "local", "debug")
SLURM_SIGNAL_DELAY_S = 120  # DINO's choice: time to finish a checkpoint before Slurm's SIGKILL


@dataclasses.dataclass(frozen=True)
class JobKind:
    """A script the launcher can run: its module and its function taking parsed arguments."""
    script: str
    run: str
    description: str


JOBS: Dict[str, JobKind] = {
    "train": JobKind("main_dino_sparo", "train_dino", "DINO pre-training (main_dino_sparo.py)"),
    "knn": JobKind("eval_knn", "eval_knn", "k-NN evaluation of a checkpoint (eval_knn.py)"),
    "linear": JobKind("eval_linear", "eval_linear", "linear probe on frozen features (eval_linear.py)"),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The launcher's own flags; the job script's flags are added by build_parser()."""
    parser = argparse.ArgumentParser("Submitit for SPARO-DINO", add_help=False)
    group = parser.add_argument_group("launcher (submitit)")
    group.add_argument("--job", default="train", choices=sorted(JOBS),
                       help="What the job runs: train (main_dino_sparo.py), knn (eval_knn.py) or "
                            "linear (eval_linear.py). The script's own flags follow.")
    group.add_argument("--cluster", default="slurm", choices=CLUSTERS,
                       help="slurm: submit with sbatch (from a login node). local: run the same job "
                            "on this machine in background processes (one node). debug: run it in "
                            "this process, with pdb on an exception.")
    group.add_argument("--ngpus", default=8, type=utils.non_negative_int,
                       help="GPUs per node; one task (process) per GPU. 0 runs CPU tasks "
                            "(gloo), --ntasks_per_node of them on each node.")
    group.add_argument("--nodes", default=2, type=utils.positive_int, help="Number of nodes to request.")
    group.add_argument("--ntasks_per_node", default=None, type=utils.positive_int,
                       help="Tasks per node with --ngpus 0 (default 1). With GPUs it is --ngpus.")
    group.add_argument("--timeout", default=2800, type=utils.positive_int,
                       help="Duration of one job allocation in minutes; the job requeues itself "
                            "when it runs out, so this is not the length of training.")
    group.add_argument("--max_num_timeout", default=30, type=utils.non_negative_int,
                       help="How many times a job may time out and requeue (pre-emptions do not count).")
    group.add_argument("--partition", default=None, type=str,
                       help="Slurm partition (default: the cluster's default partition).")
    group.add_argument("--account", default=None, type=str, help="Slurm account to charge.")
    group.add_argument("--qos", default=None, type=str, help="Slurm quality of service.")
    group.add_argument("--comment", default=None, type=str,
                       help="Comment to pass to the scheduler, e.g. a priority justification.")
    group.add_argument("--constraint", default=None, type=str,
                       help="Slurm node feature constraint, e.g. 'volta32gb' or 'a100|h100'.")
    group.add_argument("--use_volta32", action="store_true",
                       help="Request 32GB V100 GPUs (DINO's flag; the same as --constraint volta32gb). "
                            "The pinned torch build has no V100 kernels: see README, GPUs.")
    group.add_argument("--mem_per_gpu", default=40, type=utils.positive_float,
                       help="Host memory in GB per GPU (per task with --ngpus 0); the node asks "
                            "for this times the tasks per node.")
    group.add_argument("--cpus_per_task", default=10, type=utils.positive_int,
                       help="CPU cores per task; keep it at least --num_workers.")
    group.add_argument("--shared_dir", default=None, type=str,
                       help="A folder every node can read and write. Submitit's logs go to "
                            "SHARED_DIR/JOBID/, and --output_dir defaults to that folder too.")
    group.add_argument("--wait", default=None, type=utils.bool_flag,
                       help="Stay and print the job's output (task 0) until it ends, then exit with "
                            "its status. Default: true for --cluster local, false for slurm.")
    return parser


def job_kind_from_argv(argv: Sequence[str]) -> str:
    """The --job value, read before the full parser exists (the parser depends on it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--job", default="train", choices=sorted(JOBS))
    known, _ = pre.parse_known_args(argv)
    return known.job


def import_job_script(job: str) -> Any:
    kind = JOBS[job]
    try:
        module = importlib.import_module(kind.script)
    except ModuleNotFoundError as error:
        if error.name != kind.script:
            raise
        raise errors.UserError(f"--job {job} needs {kind.script}.py next to run_with_submitit.py, "
                               f"and this checkout has none") from error
    if not callable(getattr(module, kind.run, None)) or not callable(getattr(module, "get_args_parser", None)):
        raise errors.UserError(f"{kind.script}.py has no {kind.run}(args) or get_args_parser(), "
                               f"so --job {job} cannot run it")
    return module


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, argparse.Namespace]:
    """(launcher arguments, the job script's arguments) from the command line and --config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    job = job_kind_from_argv(argv)
    launcher_parser, script_parser = get_args_parser(), import_job_script(job).get_args_parser()
    parser = argparse.ArgumentParser(f"Submitit for SPARO-DINO ({JOBS[job].description})",
                                     parents=[launcher_parser, script_parser])
    # No default output folder: a fixed one would make unrelated jobs resume each other's runs.
    if any(action.dest == "output_dir" for action in parser._actions):
        parser.set_defaults(output_dir=None)
    args = vars(config_files.parse_args_with_config(parser, argv))

    def only(names_from: argparse.ArgumentParser) -> argparse.Namespace:
        names = {action.dest for action in names_from._actions}
        return argparse.Namespace(**{k: v for k, v in args.items() if k in names})
    return only(launcher_parser), only(script_parser)


# ======================================================================== checking flags
def check_launcher_args(args: argparse.Namespace) -> None:
    """Refuse resource requests that cannot run, with one clear line each. (The range of each
    single flag is checked where it is parsed, by its argparse type.)"""
    if args.ntasks_per_node is not None and args.ngpus and args.ntasks_per_node != args.ngpus:
        raise errors.UserError(f"with GPUs there is one task per GPU: --ntasks_per_node "
                               f"{args.ntasks_per_node} differs from --ngpus {args.ngpus}")
    if args.use_volta32 and args.constraint and args.constraint != "volta32gb":
        raise errors.UserError(f"--use_volta32 and --constraint {args.constraint} ask for different nodes")
    if args.cluster in ("local", "debug") and args.nodes != 1:
        raise errors.UserError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1")
    if args.cluster == "debug" and tasks_per_node(args) != 1:
        raise errors.UserError("--cluster debug runs a single task in this process: use --ngpus 1 "
                               "or --ngpus 0 with --ntasks_per_node 1 (or --cluster local)")
    if args.cluster in ("local", "debug") and args.ngpus:
        import torch

        available = torch.cuda.device_count()
        if args.ngpus > available:
            raise errors.UserError(f"--ngpus {args.ngpus} but this machine has {available} CUDA "
                                   f"GPU(s); use --ngpus 0 for CPU tasks")
    if args.cluster == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise errors.UserError(f"--cluster slurm needs Slurm's {' and '.join(missing)} (run this "
                                   f"on a login node), or use --cluster local to run here")


def check_job_args(job: str, job_args: argparse.Namespace) -> None:
    """Catch bad training flags now, not after the job waited in the queue."""
    if job == "train":
        import_job_script(job).check_args(job_args)


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.ngpus if args.ngpus else (args.ntasks_per_node or 1)


# ============================================================================= folders
def resolve_folders(args: argparse.Namespace, job_args: argparse.Namespace) -> Path:
    """Make the folders absolute (jobs may start elsewhere) and return submitit's log folder.

    Both may hold %j, which becomes the job id: submitit fills it in for its logs, and the job
    fills it in for --output_dir when it first starts.
    """
    has_output_dir = hasattr(job_args, "output_dir")
    if args.shared_dir:
        log_dir = Path(args.shared_dir).expanduser().absolute() / "%j"
        if has_output_dir and job_args.output_dir is None:
            job_args.output_dir = str(log_dir)
    elif has_output_dir and job_args.output_dir is not None:
        log_dir = Path(job_args.output_dir).expanduser().absolute()
    else:
        what = "--output_dir or --shared_dir" if has_output_dir else "--shared_dir"
        raise errors.UserError(f"give {what}: a folder every node can reach, for the job's logs "
                               f"(%j becomes the job id)")
    if has_output_dir:
        job_args.output_dir = str(Path(job_args.output_dir).expanduser().absolute())
    return log_dir


# ============================================================================ executor
def make_executor(args: argparse.Namespace, log_dir: Path) -> submitit.Executor:
    """A submitit executor with the Slurm request DINO's launcher makes, or a local one."""
    executor = submitit.AutoExecutor(folder=log_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_num_timeout,
                                     **({"local_max_num_timeout": args.max_num_timeout}
                                        if args.cluster == "local" else {}))
    ntasks = tasks_per_node(args)
    slurm: Dict[str, Any] = dict(slurm_signal_delay_s=SLURM_SIGNAL_DELAY_S)
    constraint = "volta32gb" if args.use_volta32 else args.constraint
    for key, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                       ("comment", args.comment), ("constraint", constraint)):
        if value:
            slurm[f"slurm_{key}"] = value
    executor.update_parameters(
        name=f"sparo_dino_{args.job}", timeout_min=args.timeout, nodes=args.nodes,
        gpus_per_node=args.ngpus, tasks_per_node=ntasks, cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_per_gpu * ntasks, **(slurm if args.cluster == "slurm" else {}))
    return executor


def threads_per_task(args: argparse.Namespace) -> Optional[int]:
    """CPU threads for torch in each task: Slurm gives each task --cpus_per_task cores; on this
    machine the tasks share its cores."""
    if args.cluster == "slurm":
        return args.cpus_per_task
    if args.cluster == "local":
        return max(1, (os.cpu_count() or 1) // tasks_per_node(args))
    return None  # debug: the job runs in this process, which keeps its settings


# ====================================================================== the job itself
class SubmititJob:
    """What every task of a submitted job runs. On a time-out or pre-emption, submitit calls
    checkpoint() on task 0, which resubmits a new job of the same arguments."""

    def __init__(self, job: str, job_args: argparse.Namespace, ngpus: int,
                 threads: Optional[int] = None, repo_dir: str = str(REPO_DIR)) -> None:
        self.job, self.job_args, self.ngpus = job, job_args, ngpus
        self.threads, self.repo_dir = threads, repo_dir

    def __call__(self) -> Any:
        if self.repo_dir not in sys.path:  # the job may start in another folder
            sys.path.insert(0, self.repo_dir)
        job_env = submitit.JobEnvironment()
        self.fix_output_dir(job_env.job_id)
        export_distributed_env(cpu_only=self.ngpus == 0)
        if self.threads and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(self.threads)
        print(f"{job_env}: running {JOBS[self.job].script}.{JOBS[self.job].run}", flush=True)

        # This process may have started in another folder: the project's modules are imported
        # by name only now that repo_dir is on sys.path (a reference to the launcher's `utils`
        # here would be pickled with the job and imported before that, or from elsewhere).
        job_errors, job_utils = importlib.import_module("errors"), importlib.import_module("utils")
        job_folder = importlib.import_module("run_folder")
        run = getattr(importlib.import_module(JOBS[self.job].script), JOBS[self.job].run)
        args = copy.deepcopy(self.job_args)  # the job adds rank, device, ...: keep ours clean
        try:
            result = run(args)
        except job_errors.UserError as error:  # bad input found by the job: its one line, no traceback
            print(f"error: {job_errors.capped(job_errors.user_error_message(error))}", file=sys.stderr, flush=True)
            sys.exit(2)  # no result: the launcher repeats this line (wait_for)
        finally:
            job_folder.release_output_locks()
            job_utils.cleanup_distributed()
        if result is None and self.job == "train":  # training returns nothing: name its checkpoint
            return str(Path(self.job_args.output_dir) / job_folder.CHECKPOINT)
        return result

    def fix_output_dir(self, job_id: str) -> None:
        """Fill %j in --output_dir with this job's id, once: a requeued job keeps the folder."""
        output_dir = getattr(self.job_args, "output_dir", None)
        if output_dir and "%j" in output_dir:
            self.job_args.output_dir = output_dir.replace("%j", str(job_id))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on task 0 when the job times out or is pre-empted: requeue the
        same job; training resumes from output_dir/checkpoint.pth (the last finished epoch)."""
        output_dir = getattr(self.job_args, "output_dir", None)
        checkpoint = importlib.import_module("run_folder").CHECKPOINT  # by name, as in __call__
        where = f"; it resumes from {output_dir}/{checkpoint}" if output_dir else ""
        print(f"Requeuing the {self.job} job{where}", flush=True)
        resubmission = SubmititJob(self.job, copy.deepcopy(self.job_args), self.ngpus,
                                   self.threads, self.repo_dir)
        return submitit.helpers.DelayedSubmission(resubmission)


def export_distributed_env(cpu_only: bool) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from submitit's job environment,
    for utils.init_distributed_mode (the env:// rendezvous). The master is the job's first node
    and the port follows from the job id, so every task agrees without talking first."""
    if cpu_only:  # CPU tasks: hide GPUs so the job uses gloo and keeps off them
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    if submitit.JobEnvironment().num_nodes == 1:
        dist_env.master_addr = "127.0.0.1"  # one node: loopback works even where hostnames do not resolve
    # Every task sees all the node's GPUs and picks its own with its local rank.
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)


# ============================================================================= waiting
class LogFollower:
    """Prints what a job's task 0 appends to its stdout and stderr files."""

    def __init__(self, job: submitit.Job) -> None:
        self.streams = [(job.paths.stdout, sys.stdout), (job.paths.stderr, sys.stderr)]
        self.offsets = {path: 0 for path, _ in self.streams}

    def flush(self) -> None:
        for path, stream in self.streams:
            try:
                with open(path, "r", errors="replace") as handle:
                    handle.seek(self.offsets[path])
                    text = handle.read()
                    self.offsets[path] = handle.tell()
            except FileNotFoundError:
                continue
            if text:
                stream.write(text)
                stream.flush()


def wait_for(job: submitit.Job, poll_s: float = 1.0) -> Any:
    """Follow the job until it ends; return its result or exit with an error line."""
    follower = LogFollower(job)
    while not job.done():
        follower.flush()
        time.sleep(poll_s)
    time.sleep(0.2)  # let the last lines reach the files
    follower.flush()
    try:
        return job.results()[0]  # task 0's result
    except submitit.core.utils.FailedJobError as error:  # its traceback is in the log printed above
        raise errors.UserError(f"job {job.job_id} failed (its error is printed above); its logs: "
                               f"{job.paths.stdout.parent}") from error
    except submitit.core.utils.UncompletedJobError as error:
        # submitit's message: a header, the state line, then the job's whole log. A job that
        # met bad input ended with its own `error:` line: that is the reason.
        lines = [line.strip() for line in str(error).splitlines()]
        reason = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
        if reason:
            raise errors.UserError(f"job {job.job_id} stopped: {reason}") from error
        state = next((line for line in lines if "has not produced any output" in line), "no result")
        raise errors.UserError(f"job {job.job_id} did not finish ({state}); its logs: "
                               f"{job.paths.stdout.parent}") from error


def stop_with_the_launcher() -> None:
    """Ctrl-C, or SIGINT/SIGTERM sent to the launcher, stop a local job it follows.

    A shell starts background commands with SIGINT ignored, and the job's processes would
    inherit that; a handler here gives them the default instead (exec resets handled signals).
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def describe(result: Any) -> str:
    """A job's result in one line: the checkpoint path, or an evaluation's numbers as JSON."""
    return json.dumps(result, default=str) if isinstance(result, dict) else str(result)


def remove_empty_template_folder(log_dir: Path) -> None:
    """submitit's local controller also creates the log folder with %j unfilled; drop it."""
    if "%j" in str(log_dir) and log_dir.is_dir() and not any(log_dir.iterdir()):
        log_dir.rmdir()


def stop_following(job: submitit.Job, cluster: str, output_dir: Optional[str]) -> str:
    """Cancel a local job (it lives on this machine, with the launcher); say how to go on."""
    if cluster != "local":
        return f"Stopped following; job {job.job_id} keeps running."
    job.cancel()
    deadline = time.time() + 15
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    resume = f" with --output_dir {output_dir.replace('%j', str(job.job_id))}" if output_dir else ""
    return f"Interrupted: job {job.job_id} stopped; run the command again{resume} to resume."


# ================================================================================ main
def main(argv: Optional[Sequence[str]] = None) -> None:
    args, job_args = parse_args(argv)
    check_launcher_args(args)
    check_job_args(args.job, job_args)
    log_dir = resolve_folders(args, job_args)
    output_dir = getattr(job_args, "output_dir", None)
    resumable = run_folder.resume_candidates(output_dir) if output_dir and "%j" not in output_dir else []
    if resumable:
        print(f"{output_dir} holds {resumable[0].name}: the job resumes from it.")

    # ============ submitting the job ... ============
    wait = args.wait if args.wait is not None else args.cluster == "local"
    if wait and args.cluster == "local":
        stop_with_the_launcher()
    executor = make_executor(args, log_dir)
    task = SubmititJob(args.job, job_args, args.ngpus, threads_per_task(args))
    job = executor.submit(task)
    print(f"Submitted job_id: {job.job_id}")
    if output_dir:
        print(f"Output: {output_dir.replace('%j', str(job.job_id))}")
    print(f"Logs: {job.paths.stdout} (task 0; {job.paths.stderr.name} for errors)", flush=True)

    # ============ following it on this machine ... ============
    if args.cluster == "debug":
        print(f"Job finished: {describe(job.results()[0])}")
        return
    if wait:
        try:
            result = wait_for(job)
        except KeyboardInterrupt:
            print(stop_following(job, args.cluster, output_dir), file=sys.stderr)
            sys.exit(130)
        finally:
            if args.cluster == "local":
                remove_empty_template_folder(log_dir)
        print(f"Job {job.job_id} finished: {describe(result)}")


if __name__ == "__main__":
    errors.run_main(main)
