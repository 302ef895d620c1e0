"""The whole GPU check in one command, sized for a short GPU lease (about 8 minutes).

    bash bench/gpu_check.sh                     # on the GPU machine: installs .whl/*.whl, then runs this
    python bench/gpu_check.py --out DIR         # the same without the wheels
    python bench/gpu_check.py --dry-run         # print the plan and the commands, run nothing

Steps, in priority order. Each runs as a child process under its own time cap, cut to what
is left of --budget; a step that fails, crashes or runs out of time is recorded, and the
next one runs. Without a CUDA GPU every GPU step is recorded as skipped (this is how the
script is tested on the CPU machine: tests/test_gpu_check.py).

  env      versions: python, torch and its CUDA, nvcc, the GPU (nvidia-smi), deepspeed, rwkv,
           flash-linear-attention (fla), triton
  build    the JIT build of the WKV extension, head size 64, timed (32 and 128 build in the
           background meanwhile: the GPU tests need them), then the start-up self-test of both
           versions, timed, and the same check through cuda_unavailable_reason
  tests    pytest tests/test_wkv_cuda.py (the GPU tests) and tests/test_wkv_self_test.py
  kernels  bench/bench_gpu.py --skip-train: WKV-7 and WKV-6 forward and forward+backward at
           B=8, T=4096, H=16, N=64, bf16: our kernel and our PyTorch chunked path, outputs compared
  fla      the same for flash-linear-attention's chunk_rwkv7 / chunk_rwkv6 (compared with our
           PyTorch path again), after both versions' own rows: Triton's first-call autotune
           is the one unknown cost, so it cannot take the RWKV-6 figures with it
  train    bench/bench_gpu.py --skip-kernel --rows ...: RWKV-7 0.1B, 1.5B (Bone and LoRA with
           --grad_cp 1: the memory goal), 0.4B, 1.5B; LoRA, PiSSA, Bone, Bat; ctx 1024; batch 1
  suite    the CPU suite's tests that take the GPU path when a GPU is present (training, chat,
           evaluation), with whatever time is left

Writes DIR/gpu_check.log (everything printed, the children's output included),
DIR/gpu_check.json ({"env", "steps": {name: {"status", "seconds", ...}}, "kernel": rows,
"train": rows, "goals": {...}}) and DIR/bench_gpu.json (bench_gpu.py's own results file).
Exit code 1 when a step failed or ran out of time (skipped and not-run steps are not failures).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "GPU_CHECK_RESULT "  # a child's last line: this tag, then its result as JSON

# Training rows (bench_gpu.py --rows MODEL:METHOD:GRAD_CP), in run order: the ratio goals
# (0.1B), the memory goal (1.5B Bone with --grad_cp 1, LoRA beside it), then the other shapes.
TRAIN_ROWS = ("0.1B:lora:0,0.1B:bone:0,0.1B:bat:0,0.1B:pissa:0,1.5B:bone:1,1.5B:lora:1,"
              "0.4B:lora:0,0.4B:bone:0,0.4B:bat:0,0.4B:pissa:0,1.5B:lora:0,1.5B:bone:0,1.5B:bat:0,1.5B:pissa:0")
# Tests that take the GPU path when torch sees a GPU: training runs (--op auto, DeepSpeed on
# CUDA), chat and evaluation (their --device defaults to cuda there).
SUITE_TESTS = ("tests/test_train.py", "tests/test_demo.py", "tests/test_eval.py", "tests/test_generate.py")
# Each step's time cap in seconds (before cutting to what is left of --budget).
CAPS = {"env": 30, "build": 240, "tests": 150, "kernels": 90, "fla": 120, "train": 240, "suite": 150}
# Seconds the build step leaves itself, after the background builds' deadline, to report.
REPORT_MARGIN = 20
STEPS = tuple(CAPS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "out" / "gpu_check",
                   help="folder for gpu_check.log, gpu_check.json and bench_gpu.json (default: %(default)s)")
    p.add_argument("--budget", type=float, default=460.0,
                   help="seconds for the whole check; no step starts after it, a running one is cut at it "
                        "(default: %(default)s, 8 minutes less the wheel install)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma list of steps to run, in this fixed order: {','.join(STEPS)} (default: all)")
    p.add_argument("--train-rows", default=TRAIN_ROWS, help="bench_gpu.py --rows for the train step")
    p.add_argument("--dry-run", action="store_true", help="print the plan and each step's command; run nothing")
    p.add_argument("--child", choices=("build",), help=argparse.SUPPRESS)  # a step run inside a child process
    p.add_argument("--cap", type=float, default=CAPS["build"], help=argparse.SUPPRESS)  # the child's time cap
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for s in args.steps:
        if s not in STEPS:
            p.error(f"unknown step {s!r}; choose from {', '.join(STEPS)}")
    if args.budget <= 0:
        p.error("--budget must be positive")
    return args


# ----------------------------------------------------------------------------------------
# The log: everything printed goes to stdout and to DIR/gpu_check.log
# ----------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_child(cmd: list[str], cap: float, log: Log) -> tuple[str, list[str]]:
    """Run cmd (its own process group) with its output copied line by line into the log.
    Returns (status, output lines); status is "ok", "exit N" or "timed out after N s"."""
    log(f"$ {' '.join(cmd)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []

    def copy():
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if not line.startswith(RESULT_TAG):
                log(f"  | {line}")

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(cap, 1.0))
        status = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started (ninja, nvcc, pytest workers)
        proc.wait()
        status = f"timed out after {cap:.0f} s"
    reader.join(timeout=10)
    return status, lines


def child_result(lines: list[str]) -> dict:
    for line in reversed(lines):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {}


def pytest_summary(lines: list[str]) -> dict:
    """Counts from pytest's last summary line, and the ids of failed or erroring tests."""
    counts = {}
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if found and ("=" in line or " in " in line):
            counts = {kind.rstrip("s") if kind == "errors" else kind: int(n) for n, kind in found}
            break
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "failed": failed}


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"
    return (out.stdout or out.stderr).strip()


def env_step(log: Log) -> dict:
    """Versions, read without importing torch here (the children do the GPU work)."""
    env = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "triton", "deepspeed", "rwkv", "flash-linear-attention", "fla-core", "ninja", "pytest",
                 "pytest-xdist", "transformers", "pydantic"):
        env[name] = package_version(name)
    torch_info = command_output([sys.executable, "-c", "import torch; print(torch.version.cuda, "
                                 "torch.cuda.is_available(), torch.cuda.device_count())"])
    env["torch.version.cuda, cuda available, devices"] = torch_info
    env["nvidia-smi"] = command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm",
                                        "--format=csv,noheader"])
    nvcc = command_output(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-2] if nvcc and len(nvcc.splitlines()) >= 2 else nvcc
    for key, value in env.items():
        log(f"  {key}: {value}")
    # fla's module comes from flash-linear-attention or from fla-core alone (its kernels' package)
    env["fla module"] = fla_origin()
    missing = [n for n, there in (("deepspeed", env["deepspeed"]), ("flash-linear-attention", env["fla module"]),
                                  ("rwkv", env["rwkv"])) if there is None]
    status = "ok" if not missing else f"ok; not installed: {', '.join(missing)} (bring them as wheels: bench/README.md)"
    return {"status": status, "env": env}


def fla_origin() -> str | None:
    """Where the `fla` module would be imported from (None when no installed package gives it),
    found without importing it (that would import triton and torch here)."""
    import importlib.util

    spec = importlib.util.find_spec("fla")
    return spec.origin if spec is not None else None


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | str]:
    """Each process's exit code, or "timed out" for one still running at deadline
    (time.monotonic()), which is then killed with whatever it started (ninja, nvcc)."""
    codes: list[int | str] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            codes.append("timed out")
    return codes


def build_child(cap: float = CAPS["build"]) -> dict:
    """Inside the child: build the extension (timed) and self-test both versions (timed).
    The background builds get until cap less REPORT_MARGIN seconds after the start."""
    deadline = time.monotonic() + cap - REPORT_MARGIN
    import torch

    sys.path.insert(0, str(REPO))
    from rwkv_peft.model import wkv_cuda
    from rwkv_peft.model.wkv_self_test import self_test

    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA GPU (torch.cuda.is_available() is False)"}
    device = torch.device("cuda", torch.cuda.current_device())
    result = {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    reason = wkv_cuda._toolchain_reason(device, 64)
    if reason is not None:
        return {**result, "status": f"failed: {reason}"}
    # The GPU tests also need head sizes 32 and 128: build them in the background meanwhile.
    background = [subprocess.Popen([sys.executable, "-c", f"from rwkv_peft.model import wkv_cuda; "
                                    f"wkv_cuda.load_extension({n})"], cwd=REPO, start_new_session=True)
                  for n in (32, 128)]
    t0 = time.perf_counter()
    try:
        ext = wkv_cuda.load_extension(64, device)
    except Exception as e:
        wait_all(background, 0.0)
        return {**result, "status": f"failed: build: {wkv_cuda._first_error_line(e)}"}
    result["build_s"] = round(time.perf_counter() - t0, 1)
    print(f"extension (head size 64) built or loaded in {result['build_s']} s", flush=True)
    for version, wrapper in ((7, wkv_cuda._wkv7), (6, wkv_cuda._wkv6)):
        t0 = time.perf_counter()
        reason = self_test(functools.partial(wrapper, ext), version, 64, device)
        torch.cuda.synchronize(device)
        result[f"self_test_v{version}_s"] = round(time.perf_counter() - t0, 3)
        result[f"self_test_v{version}"] = reason or "passed"
        print(f"self-test RWKV-{version}: {reason or 'passed'} ({result[f'self_test_v{version}_s']} s)", flush=True)
    result["cuda_unavailable_reason"] = {v: wkv_cuda.cuda_unavailable_reason(device, 64, v) for v in (7, 6)}
    result["background_builds"] = wait_all(background, deadline)
    problems = [f"RWKV-{v}: {r}" for v, r in result["cuda_unavailable_reason"].items() if r is not None]
    problems += [f"the background build of head size {n} " + (code if isinstance(code, str) else f"exited {code}")
                 for n, code in zip((32, 128), result["background_builds"]) if code]
    result["status"] = "failed: " + "; ".join(problems) if problems else "ok"
    return result


def step_command(step: str, args, cap: float) -> list[str]:
    py = sys.executable
    bench = [py, "bench/bench_gpu.py", "--json", str(args.out / "bench_gpu.json")]
    if step == "build":
        return [py, "bench/gpu_check.py", "--child", "build", "--cap", f"{cap:.0f}", "--out", str(args.out)]
    if step == "tests":
        return [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/test_wkv_cuda.py",
                "tests/test_wkv_self_test.py"]
    if step in ("kernels", "fla"):
        ops = "cuda,torch" if step == "kernels" else "torch,fla"
        return [*bench, "--skip-train", "--kernel-shape", "8,4096,16", "--kernel-versions", "7,6",
                "--kernel-ops", ops, "--repeats", "10"]
    if step == "train":
        # bench_gpu.py starts no new row after --time-budget; the margin lets a started 1.5B row end
        budget = max(10, int(cap) - 45)
        return [*bench, "--skip-kernel", "--rows", args.train_rows, "--ctx", "1024", "--micro-bsz", "1",
                "--steps", "5", "--warmup", "2", "--time-budget", str(budget)]
    if step == "suite":
        xdist = ["-n", "8"] if package_version("pytest-xdist") else []
        return [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *xdist, *SUITE_TESTS]
    raise ValueError(step)


def step_result(step: str, status: str, lines: list[str]) -> dict:
    """A child step's record from its exit status and output."""
    if step == "build":
        result = child_result(lines)  # carries its own status, unless the child died first
        return result if result and status in ("ok", "exit 1") else {**result, "status": status}
    if step in ("tests", "suite"):
        result = pytest_summary(lines)
        counts = ", ".join(f"{n} {kind}" for kind, n in result["counts"].items())
        verdict = {"ok": "ok", "exit 1": "failed", "exit 5": "skipped: no tests collected"}.get(status, status)
        return {**result, "status": f"{verdict}: {counts}" if counts else verdict}
    if any("needs a CUDA GPU" in line for line in lines):  # bench_gpu.py without a GPU
        return {"status": "skipped: no CUDA GPU"}
    return {"status": status}


# ----------------------------------------------------------------------------------------
# Goals: the ratios, taken from rows of the same run
# ----------------------------------------------------------------------------------------


def goals(kernel_rows: list[dict], train_rows: list[dict]) -> dict:
    """Each goal: {"value", "target", "met"} (met is None where a row is missing)."""

    def ok(rows, **match):
        for r in rows:
            if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    def goal(value, target: str, met):
        return {"value": None if value is None else round(value, 3), "target": target,
                "met": None if value is None else bool(met)}

    out = {}
    ours, fla = ok(kernel_rows, version=7, op="cuda"), ok(kernel_rows, version=7, op="fla")
    speedup = fla["fwd_bwd_ms"] / ours["fwd_bwd_ms"] if ours and fla else None
    out["wkv7 fwd+bwd: fla time / our kernel time"] = goal(speedup, ">= 1.5", speedup is not None and speedup >= 1.5)
    for model in ("0.1B", "0.4B", "1.5B"):
        lora, bone, bat = (ok(train_rows, model=model, method=m, grad_cp=0) for m in ("lora", "bone", "bat"))
        if lora and bone:
            ratio = bone["tokens_per_s"] / lora["tokens_per_s"]
            out[f"{model} Bone/LoRA tokens/s"] = goal(ratio, ">= 1.10", ratio >= 1.10)
            mem = bone["peak_mb"] / lora["peak_mb"]
            out[f"{model} Bone/LoRA peak memory"] = goal(mem, "<= 1.00", mem <= 1.0)
        if bone and bat:
            ratio = bat["tokens_per_s"] / bone["tokens_per_s"]
            out[f"{model} Bat/Bone tokens/s"] = goal(ratio, ">= 0.95", ratio >= 0.95)
            mem = bat["peak_mb"] / bone["peak_mb"]
            out[f"{model} Bat/Bone peak memory"] = goal(mem, "<= 1.10", mem <= 1.10)
    bone_cp = ok(train_rows, model="1.5B", method="bone", grad_cp=1, ctx=1024, micro_bsz=1)
    peak = bone_cp["peak_mb"] / 1024 if bone_cp else None
    out["1.5B Bone r=64 ctx 1024 batch 1 --grad_cp 1: peak GiB"] = goal(peak, "<= 4", peak is not None and peak <= 4)
    return out


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "build":
        result = build_child(args.cap)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0 if result["status"].startswith(("ok", "skipped")) else 1
    if args.dry_run:
        print(f"plan: {', '.join(args.steps)} within {args.budget:.0f} s; results in {args.out}")
        for step in args.steps:
            cmd = "(versions, in this process)" if step == "env" else " ".join(step_command(step, args, CAPS[step]))
            print(f"  {step} (cap {CAPS[step]} s): {cmd}")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "steps": {}}
    json_path = args.out / "gpu_check.json"

    def save():
        bench = args.out / "bench_gpu.json"
        if bench.exists():
            data = json.loads(bench.read_text())
            report["kernel"], report["train"] = data.get("kernel", []), data.get("train", [])
            report["goals"] = goals(report["kernel"], report["train"])
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(json_path)

    t_start = time.perf_counter()
    for step in args.steps:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 5:
            report["steps"][step] = {"status": "not run: out of budget"}
            log(f"== {step}: not run, out of budget")
            save()
            continue
        cap = min(CAPS[step], left)
        log(f"== {step} (cap {cap:.0f} s, {left:.0f} s left)")
        t0 = time.perf_counter()
        if step == "env":
            result = env_step(log)
            report["env"] = result.pop("env")
        else:
            status, lines = run_child(step_command(step, args, cap), cap, log)
            result = step_result(step, status, lines)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"][step] = result
        log(f"== {step}: {result['status']} ({result['seconds']} s)")
        save()

    report["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    log("\n== summary")
    for step, result in report["steps"].items():
        log(f"  {step:8s} {result['status']}" + (f" ({result['seconds']} s)" if "seconds" in result else ""))
    for name, g in report.get("goals", {}).items():
        mark = {True: "met", False: "NOT met", None: "no data"}[g["met"]]
        log(f"  goal {name}: {g['value']} (target {g['target']}): {mark}")
    log(f"wrote {json_path} and {args.out / 'gpu_check.log'} ({report['seconds']} s)")
    log.close()
    good = ("ok", "skipped", "not run")
    return 0 if all(r["status"].startswith(good) for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
