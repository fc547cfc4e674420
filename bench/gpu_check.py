"""First-GPU check (issue 30): what a first run on a GPU machine must prove, in one report.

    bench/gpu_check.sh [--dry] [--dino_repo PATH] [--out DIR] [--budget SECONDS]
    PYTHON=/path/to/python DINO_REPO=/path/to/dino bench/gpu_check.sh

README (GPUs, "The first run on a GPU machine") lists the parts and what each measures. Each
part runs in its own process with its own time limit (Sizes), all within --budget seconds; a part
that would start with too little time left is skipped and says so. OUT/report.json and
OUT/report.md hold one line per part: its figures, read back from the part's own results file, or
FAILED / SKIPPED and why. --dry (automatic without a usable CUDA GPU) runs every part at toy size
on the CPU, the compile part with TORCHDYNAMO_DISABLE=1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

import devices  # noqa: E402
import errors  # noqa: E402
import run_folder  # noqa: E402
import utils  # noqa: E402
from bench.dino_original import DINO_REPO, dino_available  # noqa: E402

IMAGENET = dict(num_train=1281167, num_test=50000, dim=4096, num_classes=1000)
AMP_PARITY = "amp and parity"  # the AMP parity test, by its name, wherever it lives


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("gpu_check", description="First-GPU check; see the module docstring.")
    parser.add_argument("--dry", action="store_true",
                        help="Every part at toy size on the CPU (automatic without a usable CUDA GPU).")
    parser.add_argument("--dino_repo", default=DINO_REPO,
                        help="A copy of facebookresearch/dino (default: the DINO_REPO environment variable).")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu_check_out"),
                        help="Folder of the report, the parts' results and logs (a rerun replaces them "
                             "and reuses the JPEGs it wrote, OUT/photosN).")
    parser.add_argument("--budget", type=utils.positive_float, default=None,
                        help="Seconds for all parts (default 330 on a GPU, 240 in dry mode).")
    return parser


@dataclass
class Part:
    name: str
    title: str
    status: str = "not run"  # measured, passed, failed or skipped
    reason: Optional[str] = None
    seconds: Optional[float] = None
    figures: Dict[str, Any] = field(default_factory=dict)
    commands: List[List[str]] = field(default_factory=list)
    logs: List[str] = field(default_factory=list)


@dataclass
class Sizes:
    """What each part runs: DINO's recipe and ImageNet's shape on a GPU, toy sizes in dry mode."""
    train: List[str]
    photos: int  # JPEGs of the loader and end-to-end parts
    loader: List[str]
    end_to_end: List[str]
    knn: List[str]
    limits: Dict[str, float]  # the longest each part may run
    needs: Dict[str, float]   # the time a part must have left to start


GPU_SIZES = Sizes(
    train=["--arch", "vit_small", "--patch_size", "16", "--global_crops_size", "224", "--local_crops_size", "96",
           "--local_crops_number", "8", "--out_dim", "65536", "--batch_size_per_gpu", "64", "--use_fp16", "true",
           "--augment_on_device", "true", "--warmup_steps", "2", "--steps", "10", "--rounds", "3",
           "--gemm_size", "8192", "--device", "cuda"],
    photos=1000,
    loader=["--workers", "10", "14", "--passes", "3", "--device", "cuda"],
    end_to_end=["--arch", "vit_small", "--patch_size", "16", "--out_dim", "65536", "--batch_size_per_gpu", "64",
                "--num_workers", "10", "--eval_train_subset", "0", "--eval_test_subset", "0", "--device", "cuda"],
    knn=[f"--{k}={v}" for k, v in IMAGENET.items()] + ["--gemm_size", "8192", "--device", "cuda"],
    limits=dict(gpu_tests=150, train_step=150, loader=120, end_to_end=120, amp_parity=90, knn=90, compile=300),
    needs=dict(gpu_tests=30, train_step=60, loader=40, end_to_end=60, amp_parity=20, knn=40, compile=200))
DRY_SIZES = Sizes(
    train=["--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "8", "--local_crops_size", "4",
           "--local_crops_number", "2", "--out_dim", "64", "--sparo_slots", "4", "--sparo_dim", "4",
           "--batch_size_per_gpu", "4", "--augment_on_device", "true", "--warmup_steps", "1", "--steps", "1",
           "--rounds", "1", "--gemm_size", "128", "--device", "cpu"],
    photos=24,
    loader=["--workers", "1", "2", "--passes", "2", "--batch_size_per_gpu", "4",
            "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--device", "cpu"],
    end_to_end=["--arch", "vit_nano", "--patch_size", "4", "--global_crops_size", "16", "--local_crops_size", "8",
                "--local_crops_number", "2", "--out_dim", "256", "--sparo_slots", "16", "--sparo_dim", "16",
                "--batch_size_per_gpu", "8", "--num_workers", "1", "--eval_train_subset", "200",
                "--eval_test_subset", "100", "--device", "cpu"],
    knn=["--num_train", "2000", "--num_test", "200", "--dim", "64", "--num_classes", "10", "--gemm_size", "256",
         "--device", "cpu"],
    limits=dict(gpu_tests=90, train_step=60, loader=60, end_to_end=60, amp_parity=60, knn=30, compile=60),
    needs=dict(gpu_tests=10, train_step=10, loader=10, end_to_end=10, amp_parity=10, knn=5, compile=10))


class Check:
    """Runs the parts within the budget and keeps the report on disk after each one."""

    def __init__(self, args: argparse.Namespace, dry: bool) -> None:
        self.args, self.dry, self.out = args, dry, Path(args.out)
        self.sizes = DRY_SIZES if dry else GPU_SIZES
        self.photos = self.out / f"photos{self.sizes.photos}"  # kept: a rerun reuses them
        self.budget = args.budget or (240.0 if dry else 330.0)
        self.started = time.monotonic()
        self.parts: List[Part] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if dry:  # every part on the CPU, also on a GPU machine
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        for stale in ("logs", "end_to_end"):  # this check's own folders
            shutil.rmtree(self.out / stale, ignore_errors=True)
        for stale in [*self.out.glob("*.json"), *self.out.glob("*.xml")]:
            stale.unlink()
        (self.out / "logs").mkdir(parents=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def add(self, part: Part) -> Part:
        self.parts.append(part)
        return part

    def run(self, part: Part, command: List[str], limit_key: str, log_name: Optional[str] = None,
            env: Optional[Dict[str, str]] = None) -> bool:
        """Run one command of `part` with its limit (cut to the budget left). False, with the
        part marked skipped or failed and why, unless it exited 0."""
        left, need = self.left(), self.sizes.needs[limit_key]
        if left < need:
            part.status, part.reason = "skipped", (f"{max(left, 0):.0f} s of the {self.budget:.0f}-s budget "
                                                   f"left; it needs about {need:.0f} s")
            return False
        limit = min(self.sizes.limits[limit_key], left)
        log = self.out / "logs" / f"{log_name or part.name}.log"
        part.commands.append(command)
        part.logs.append(str(log.relative_to(self.out)))
        print(f"== {part.title}: {' '.join(command)}", flush=True)
        start = time.monotonic()
        with log.open("w") as stream:
            process = subprocess.Popen(command, cwd=REPO, env={**self.env, **(env or {})}, stdout=stream,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code: Optional[int] = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the part's own process group
                process.wait()
                code = None
        part.seconds = round((part.seconds or 0) + time.monotonic() - start, 1)
        if code == 0:
            return True
        if code is None and limit < self.sizes.limits[limit_key]:  # the check's time ran out, not the part's
            part.status = "skipped"
            part.reason = f"stopped at the budget's end after {limit:.0f} s (a larger --budget runs it)"
        else:
            part.status = "failed"
            part.reason = (f"stopped at its {limit:.0f}-s limit" if code is None
                           else f"exit status {code}: {last_line(log)}")
        return False

    def write(self, versions: Dict[str, Any]) -> Dict[str, Any]:
        report = dict(mode="dry (toy sizes on the CPU)" if self.dry else "gpu", versions=versions,
                      budget_s=self.budget, seconds=round(time.monotonic() - self.started, 1),
                      passed=not any(p.status == "failed" for p in self.parts),
                      parts=[asdict(p) for p in self.parts])
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.out / "report.md").write_text(markdown(report))
        return report


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def read_json(part: Part, path: Path) -> Optional[Dict[str, Any]]:
    """A part's results file, or None with the part marked failed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        part.status, part.reason = "failed", f"no results in {path.name} ({error})"
        return None


# ===================================================================================== parts
def versions(dino_repo: str) -> Dict[str, Any]:
    """What runs here: interpreter, libraries, the build's CUDA and architectures, the GPUs,
    and which DINO code the original step comes from."""
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    found = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                 timm=timm_version, arch_list=torch.cuda.get_arch_list(),
                 driver=first_output_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                 cpu=devices.cpu_name(), cpu_cores=len(os.sched_getaffinity(0)),
                 commit=first_output_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]), dino_repo=dino_repo,
                 dino_commit=first_output_line(["git", "-C", dino_repo, "rev-parse", "HEAD"]),
                 gpus=[dict(name=torch.cuda.get_device_name(i),
                            capability=".".join(map(str, torch.cuda.get_device_capability(i))),
                            memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1))
                       for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    return found


def first_output_line(command: List[str]) -> Optional[str]:
    """The first line a command prints (the driver's version, a commit), or None when it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.split("\n")[0].strip() or None if result.returncode == 0 else None


def pytest_part(check: Check, part: Part, selection: List[str], limit_key: str) -> None:
    """pytest over tests/ with `selection`; figures: the outcome counts (junit XML)."""
    xml = check.out / f"{part.name}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *selection, "tests"]
    ok = check.run(part, command, limit_key)
    if part.status == "skipped" or not xml.exists():
        return
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failed: List[str] = []
    skip_reasons = set()
    for case in ElementTree.parse(xml).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        name = f"{case.get('classname', '')}::{case.get('name')}"
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skip_reasons.add((outcome.get("message") or "").strip())
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failed.append(name)
    part.figures = dict(counts, failed_tests=failed)
    if part.status == "failed" and sum(counts.values()) == 0 and "exit status 5" in (part.reason or ""):
        part.status, part.reason = "skipped", "no test selected (pytest " + " ".join(selection) + ")"
    elif ok and counts["passed"] == 0:
        part.status = "skipped"
        part.reason = f"all {counts['skipped']} skipped: {'; '.join(sorted(skip_reasons)) or 'no test selected'}"
    elif ok:
        part.status = "passed"


def train_step_parts(check: Check, dino_repo: str) -> None:
    step = check.add(Part("train_step", "training step vs the original DINO step"))
    stage = check.add(Part("device_stage", "device stage cost per step"))
    result = check.out / "train_step.json"
    command = [sys.executable, "bench/train_throughput.py", *check.sizes.train, "--variants", "sparo", "cls",
               "dino", "--dino_repo", dino_repo, "--output_json", str(result)]
    if not check.run(step, command, "train_step"):
        stage.status, stage.reason = step.status, f"from the training-step run, which was {step.status}"
        return
    data = read_json(step, result)
    if data is None:
        stage.status, stage.reason = "failed", "no training-step results"
        return
    step.status = "measured"
    step.figures = dict(device=data["device"], precision=data["precision"], tf32=data["tf32"],
                        cudnn_benchmark=data["cudnn_benchmark"], gemm_peak_gflops=data["gemm_peak_gflops"],
                        device_stage_in_steps=data["config"]["augment_on_device"], results=data["results"],
                        **ratios(data["results"]))
    if data.get("device_stage_ms") is None:
        stage.status, stage.reason = "failed", "the training-step run did not time the device stage"
        return
    stage.status, stage.seconds = "measured", step.seconds
    stage.figures = dict(ms_per_step=data["device_stage_ms"],
                         share_of_sparo_step=data["device_stage_ms"] / data["results"]["sparo"]["step_ms"])


def ratios(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    pairs = [("sparo", "dino"), ("cls", "dino"), ("sparo", "cls")]
    return {f"{a}_over_{b}": results[a]["images_per_s"] / results[b]["images_per_s"]
            for a, b in pairs if a in results and b in results}


def loader_part(check: Check) -> None:
    part = check.add(Part("loader", "loader throughput"))
    result = check.out / "loader.json"
    command = [sys.executable, "bench/loader_speed.py", *check.sizes.loader, "--photos", str(check.sizes.photos),
               "--photos_dir", str(check.photos), "--output_json", str(result)]
    if check.run(part, command, "loader") and (data := read_json(part, result)) is not None:
        part.status = "measured"
        part.figures = dict(results=data["results"], cpu=data["cpu"], photos=len(list(check.photos.iterdir())),
                            batch=data["config"]["batch_size_per_gpu"])


def end_to_end_part(check: Check) -> None:
    part = check.add(Part("end_to_end", "1 epoch end to end with the k-NN monitor, then a resume"))
    photos, run_dir = check.photos, check.out / "end_to_end"
    if not photos.is_dir():
        part.status, part.reason = "failed", "no JPEG folder: the loader part did not write it"
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    common = [sys.executable, "main_dino_sparo.py", *check.sizes.end_to_end, "--data_path", str(photos),
              "--warmup_epochs", "0", "--eval_every", "1", "--eval_data_path", "digits", "--saveckp_freq", "0",
              "--print_freq", "5", "--output_dir", str(run_dir)]
    if not check.run(part, [*common, "--epochs", "1"], "end_to_end", "end_to_end_1"):
        return
    if not check.run(part, [*common, "--epochs", "2"], "end_to_end", "end_to_end_2"):
        return
    resumed = "at epoch 1." in (check.out / "logs" / "end_to_end_2.log").read_text()
    log = run_folder.read_log(run_dir)
    if not resumed or [entry["epoch"] for entry in log] != [0, 1]:
        part.status, part.reason = "failed", f"the second run did not resume at epoch 1 (log epochs {[e['epoch'] for e in log]})"
        return
    batch = int(check.sizes.end_to_end[check.sizes.end_to_end.index("--batch_size_per_gpu") + 1])
    images = len(list(photos.iterdir())) // batch * batch  # drop_last
    part.status = "measured"
    part.figures = dict(images_per_epoch=images, epochs=[
        dict(epoch=e["epoch"], seconds=e["epoch_seconds"], images_per_s=images / e["epoch_seconds"],
             loss=e["train_loss"], knn_top1=e.get("knn_top1"), knn_seconds=e.get("knn_seconds")) for e in log])


def knn_part(check: Check, dtype: str) -> None:
    part = check.add(Part(f"knn_{dtype}", f"k-NN at ImageNet shape, {dtype}"))
    result = check.out / f"knn_{dtype}.json"
    command = [sys.executable, "bench/knn_speed.py", *check.sizes.knn, "--methods", "torch", "--dtype", dtype,
               "--output_json", str(result)]
    if check.run(part, command, "knn") and (data := read_json(part, result)) is not None:
        part.status = "measured"
        part.figures = dict(data["results"]["torch"], features_mib=data["features_mib"],
                            features_s=data["features_s"], gemm_peak_gflops=data["gemm_peak_gflops"],
                            shape={k: data["config"][k] for k in IMAGENET})


def compile_part(check: Check) -> None:
    part = check.add(Part("compile", "--compile"))
    result = check.out / "compile.json"
    command = [sys.executable, "bench/train_throughput.py", *check.sizes.train, "--variants", "sparo", "cls",
               "--compile", "true", "--output_json", str(result)]
    env = {"TORCHDYNAMO_DISABLE": "1"} if check.dry else None
    if check.run(part, command, "compile", env=env) and (data := read_json(part, result)) is not None:
        part.status = "measured"
        part.figures = dict(results=data["results"], compiler="disabled (dry: TORCHDYNAMO_DISABLE=1)"
                            if check.dry else "inductor")


# =================================================================================== report
def markdown(report: Dict[str, Any]) -> str:
    v = report["versions"]
    gpus = ", ".join(f"{g['name']} (capability {g['capability']}, {g['memory_gib']} GiB)" for g in v["gpus"]) or "none"
    lines = [f"# First-GPU check: {gpus if v['gpus'] else 'no GPU'}", "",
             f"Mode: {report['mode']}; {report['seconds']:.0f} s of a {report['budget_s']:.0f}-s budget; "
             f"{'passed' if report['passed'] else 'FAILED'}. Commit {v['commit'] or 'unknown'}; DINO code "
             f"{v['dino_repo']} (commit {v['dino_commit'] or 'unknown'}).", "",
             f"- **versions**: python {v['python']}, torch {v['torch']} (CUDA {v['cuda']}, cudnn {v['cudnn']}), "
             f"driver {v['driver'] or 'none (no nvidia-smi)'}, timm {v['timm']}; archs "
             f"{' '.join(v['arch_list']) or '(none)'}; GPUs: {gpus}; CPU {v['cpu']}, {v['cpu_cores']} cores"]
    for part in report["parts"]:
        text = FORMATTERS[part["name"]](part["figures"]) if part["status"] in ("measured", "passed") else \
            f"{part['status'].upper()}: {part['reason']}"
        if part["status"] == "skipped" and any(part["figures"].get(k) for k in ("passed", "skipped")):
            text += f" ({format_tests(part['figures'])})"
        took = f" [{part['seconds']:.0f} s]" if part["seconds"] is not None else ""
        lines.append(f"- **{part['title']}**: {text}{took}")
    return "\n".join(lines) + "\n"


def flops(gflop_per_s: float) -> str:
    return f"{gflop_per_s / 1000:.1f} TFLOP/s" if gflop_per_s >= 1000 else f"{gflop_per_s:.1f} GFLOP/s"


def memory(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def format_tests(f: Dict[str, Any]) -> str:
    text = f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"
    return text + (f"; failed: {', '.join(f['failed_tests'])}" if f["failed_tests"] else "")


def format_train_step(f: Dict[str, Any]) -> str:
    r = f["results"]
    each = ", ".join(f"{name.upper() if name != 'dino' else 'original DINO'} {x['images_per_s']:.1f} img/s "
                     f"({x['step_ms']:.1f} ms/step, peak {memory(x['peak_mib'])}, {flops(x['gflop_per_s'])})"
                     for name, x in r.items())
    ratio = ", ".join(f"{k.replace('_over_', '/')} {v:.3f}" for k, v in f.items() if "_over_" in k)
    return (f"original DINO step vs this project's on {f['device']}, {f['precision']}, TF32 {f['tf32']}, "
            f"cudnn.benchmark {f['cudnn_benchmark']}, device stage in this project's steps "
            f"{f['device_stage_in_steps']}: {each}; throughput ratios {ratio}; GEMM peak "
            f"{flops(f['gemm_peak_gflops'])}")


def format_device_stage(f: Dict[str, Any]) -> str:
    return f"{f['ms_per_step']:.2f} ms/step, {100 * f['share_of_sparo_step']:.1f} % of the SPARO step"


def format_loader(f: Dict[str, Any]) -> str:
    each = ", ".join(f"{name.split('_')[0]} pipeline with {name.split('_')[1][:-1]} workers "
                     f"{x['images_per_s']:.0f} img/s (start-up {x['startup_s']:.1f} s)" for name, x in f["results"].items())
    return f"loader throughput over {f['photos']} JPEGs, batch {f['batch']}, CPU {f['cpu']}: {each}"


def format_end_to_end(f: Dict[str, Any]) -> str:
    each = "; ".join(f"epoch {e['epoch']}{' (resumed)' if e['epoch'] else ''}: {e['images_per_s']:.1f} img/s "
                     f"({e['seconds']:.1f} s), loss {e['loss']:.3f}, k-NN top-1 {e['knn_top1']:.2f} "
                     f"({e['knn_seconds']:.1f} s)" for e in f["epochs"])
    return f"{f['images_per_epoch']} images per epoch; {each}"


def format_knn(f: Dict[str, Any]) -> str:
    s = f["shape"]
    return (f"k-NN {s['num_train']:,} x {s['dim']:,} bank, {s['num_test']:,} queries, {s['num_classes']:,} "
            f"classes: {f['seconds']:.2f} s ({flops(f['gflops'])}, {f['vs_gemm_floor']:.2f}x the GEMM floor), "
            f"peak {memory(f['peak_mib_above_features'])} above the {memory(f['features_mib'])} of features "
            f"(made on the device in {f['features_s']:.1f} s)")


def format_compile(f: Dict[str, Any]) -> str:
    first = "first step" if f["compiler"].startswith("disabled") else "first step (compilation)"
    return f"compiler {f['compiler']}: " + ", ".join(
        f"{name.upper()} {first} {x['first_step_s']:.1f} s, then {x['step_ms']:.1f} ms/step "
        f"({x['images_per_s']:.1f} img/s)" for name, x in f["results"].items())


FORMATTERS: Dict[str, Callable[[Dict[str, Any]], str]] = dict(
    gpu_tests=format_tests, amp_parity=format_tests, train_step=format_train_step,
    device_stage=format_device_stage, loader=format_loader, end_to_end=format_end_to_end,
    knn_fp32=format_knn, knn_fp16=format_knn, compile=format_compile)


# ===================================================================================== main
def usable_gpu(dry: bool) -> bool:
    """Whether the parts run on the GPU; GPUs that are visible but unusable are an error."""
    try:
        usable = devices.resolve_use_cuda("auto")
    except errors.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        print("FAIL: GPUs visible but unusable")
        sys.exit(1)
    return usable and not dry


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    dry = not usable_gpu(args.dry)
    if not args.dino_repo or not dino_available(args.dino_repo):
        raise errors.UserError(f"the check times the original DINO step and needs its code: --dino_repo PATH or "
                               f"DINO_REPO=PATH, a copy of facebookresearch/dino (got {str(args.dino_repo or 'none')!r}; "
                               f"README, GPUs: how to carry it to a GPU node)")
    dino_repo = str(Path(args.dino_repo).resolve())
    check = Check(args, dry)
    found = versions(dino_repo)
    print(f"{'dry mode: toy sizes on the CPU' if dry else 'GPU mode'}; torch {found['torch']}, CUDA {found['cuda']}, "
          f"archs {' '.join(found['arch_list']) or '(none)'}; budget {check.budget:.0f} s", flush=True)
    steps: List[Callable[[], None]] = [
        lambda: pytest_part(check, check.add(Part("gpu_tests", "pytest -m gpu")),
                            ["-m", "gpu", "-k", f"not ({AMP_PARITY})"], "gpu_tests"),
        lambda: train_step_parts(check, dino_repo),
        lambda: loader_part(check),
        lambda: end_to_end_part(check),
        lambda: pytest_part(check, check.add(Part("amp_parity", "AMP parity")), ["-k", AMP_PARITY], "amp_parity"),
        lambda: knn_part(check, "fp32"),
        lambda: knn_part(check, "fp16"),
        lambda: compile_part(check)]
    for step in steps:
        step()
        report = check.write(found)
    print((check.out / "report.md").read_text())
    print(f"GPU check {'passed' if report['passed'] else 'FAILED'}: {check.out / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    errors.run_main(lambda: sys.exit(main()))
