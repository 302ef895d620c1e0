"""The prepared GPU check (bench/gpu_check.py, bench/bench_gpu.py), dry-run on the CPU:
argument parsing, the plan, the skip logic without a GPU, the log and JSON it writes, the
goal ratios, and bench_gpu.py's kernel harness with the CUDA timing stubbed by CPU timers.
The GPU session runs it for real (bench/README.md, "The GPU check")."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu  # noqa: E402
import gpu_check  # noqa: E402

from rwkv_peft.model.wkv import wkv6_sequential, wkv7_sequential  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs bench/gpu_check.py itself")


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "plan: env, build, tests, kernels, fla, train, suite within 460 s" in out
    assert "--kernel-ops cuda,torch " in out and "--kernel-shape 8,4096,16" in out
    assert "--rows 0.1B:lora:0,0.1B:bone:0,0.1B:bat:0,0.1B:pissa:0,1.5B:bone:1" in out
    assert "tests/test_wkv_cuda.py" in out
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "env,bild"])
    assert "unknown step 'bild'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--rows", "1.5B:bone"])
    assert "--rows entry '1.5B:bone' is not MODEL:METHOD:GRAD_CP" in capsys.readouterr().err


@pytest.mark.slow
def test_without_a_gpu_each_step_is_skipped_and_recorded(tmp_path):
    """The real children (build, bench_gpu.py), as on the GPU machine; here they find no GPU."""
    out = tmp_path / "o"
    assert gpu_check.main(["--out", str(out), "--steps", "env,build,kernels"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["env", "build", "kernels"]
    assert steps["env"]["status"].startswith("ok") and report["env"]["torch"] == torch.__version__
    assert steps["build"]["status"].startswith("skipped: no CUDA GPU")
    assert steps["kernels"]["status"] == "skipped: no CUDA GPU"
    log = (out / "gpu_check.log").read_text()
    assert "bench_gpu.py needs a CUDA GPU" in log and "== summary" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_steps_past_the_budget_are_recorded_as_not_run(tmp_path):
    out = tmp_path / "o"
    assert gpu_check.main(["--out", str(out), "--budget", "2"]) == 0
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "not run: out of budget" for s in steps.values())


def test_pytest_summary_and_step_status():
    lines = ["FAILED tests/test_wkv_cuda.py::test_x[a] - AssertionError: 3", "ERROR tests/test_wkv_cuda.py::test_y",
             "=== 2 failed, 50 passed, 1 error in 12.0s ==="]
    result = gpu_check.step_result("tests", "exit 1", lines)
    assert result["counts"] == {"failed": 2, "passed": 50, "error": 1}
    assert result["failed"] == ["tests/test_wkv_cuda.py::test_x[a]", "tests/test_wkv_cuda.py::test_y"]
    assert result["status"] == "failed: 2 failed, 50 passed, 1 error"
    assert gpu_check.step_result("train", "timed out after 200 s", [])["status"] == "timed out after 200 s"
    build = gpu_check.RESULT_TAG + json.dumps({"status": "ok", "build_s": 80.0})
    assert gpu_check.step_result("build", "ok", ["x", build]) == {"status": "ok", "build_s": 80.0}
    assert gpu_check.step_result("build", "exit -9", ["x"]) == {"status": "exit -9"}


def test_goals_are_ratios_of_rows_from_the_same_run():
    kernel = [{"version": 7, "op": "cuda", "status": "ok", "fwd_bwd_ms": 8.0},
              {"version": 7, "op": "fla", "status": "ok", "fwd_bwd_ms": 64.0}]

    def row(model, method, tps, mb, cp=0):
        return {"model": model, "method": method, "grad_cp": cp, "ctx": 1024, "micro_bsz": 1, "status": "ok",
                "tokens_per_s": tps, "peak_mb": mb}

    train = [row("0.1B", "lora", 1000, 2000), row("0.1B", "bone", 1150, 1990), row("0.1B", "bat", 1000, 2300),
             row("1.5B", "bone", 300, 4200, cp=1)]
    g = gpu_check.goals(kernel, train)
    assert g["wkv7 fwd+bwd: fla time / our kernel time"] == {"value": 8.0, "target": ">= 1.5", "met": True}
    assert g["0.1B Bone/LoRA tokens/s"]["value"] == 1.15 and g["0.1B Bone/LoRA tokens/s"]["met"]
    assert g["0.1B Bone/LoRA peak memory"]["met"]
    assert g["0.1B Bat/Bone tokens/s"]["met"] is False  # 0.87
    assert g["0.1B Bat/Bone peak memory"]["met"] is False  # 1.156
    assert g["1.5B Bone r=64 ctx 1024 batch 1 --grad_cp 1: peak GiB"]["met"] is False  # 4.1 GiB
    assert "0.4B Bone/LoRA tokens/s" not in g
    assert gpu_check.goals([], [])["wkv7 fwd+bwd: fla time / our kernel time"]["met"] is None


@pytest.fixture
def cpu_timing(monkeypatch):
    """bench_gpu.py's CUDA calls answered on the CPU: a wall-clock timer, no memory figures."""
    for name, value in {"get_device_name": lambda *a: "cpu", "synchronize": lambda *a: None,
                        "reset_peak_memory_stats": lambda *a: None, "memory_allocated": lambda *a: 0,
                        "max_memory_allocated": lambda *a: 0, "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(bench_gpu, "time_cuda", lambda fn, repeats: (fn(), 1.0)[1])


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_kernel_harness_times_each_op_and_compares_outputs(cpu_timing, monkeypatch, version):
    """Stand-ins: the per-token loop as "cuda" (agrees with torch), a planted wrong op as "fla"
    (its final state 10% off); then fla's real adapter, skipped here as not installed."""
    loop = wkv7_sequential if version == 7 else wkv6_sequential

    def wrong(*x):
        y, s = loop(*x)
        return y, s * 1.1

    ops = {"cuda": (wkv7_sequential, wkv6_sequential), "torch": bench_gpu.KERNEL_OPS["torch"], "fla": (wrong, wrong)}
    monkeypatch.setattr(bench_gpu, "KERNEL_OPS", ops)
    monkeypatch.setattr(bench_gpu, "fla_missing", lambda: None)
    args = bench_gpu.parse_args(["--kernel-shape", "1,20,1", "--repeats", "1"])
    recorded = []
    rows = bench_gpu.kernel_rows(version, ["cuda", "torch", "fla"], args, torch.device("cpu"), record=recorded.append)
    # each row is recorded once timed (a run cut short keeps it), again with its comparison
    assert [r["op"] for r in recorded] == ["cuda", "torch", "fla", "cuda", "fla"]
    assert [r["op"] for r in rows] == ["cuda", "torch", "fla"] and all(r["status"] == "ok" for r in rows)
    grads = ["dr", "dw", "dk", "dv", "da", "db"] if version == 7 else ["dr", "dw", "dk", "dv", "du"]
    assert list(rows[0]["rel_err_vs_torch"]) == ["y", "state", *grads, "ds0"]
    assert max(rows[0]["rel_err_vs_torch"].values()) < 2e-2  # bf16 inputs and outputs
    assert "rel_err_vs_torch" not in rows[1]
    assert rows[2]["worst_vs_torch"].startswith(("state 1.0e-01", "ds0"))


def test_kernel_harness_skips_fla_when_not_installed(cpu_timing):
    missing = bench_gpu.fla_missing()
    if missing is None:
        pytest.skip("flash-linear-attention is importable here")
    args = bench_gpu.parse_args(["--kernel-shape", "1,20,1", "--repeats", "1"])
    row, = bench_gpu.kernel_rows(7, ["fla"], args, torch.device("cpu"))
    assert row["status"] == f"skipped: {missing}" and missing.startswith("flash-linear-attention not importable")


def test_build_step_on_a_stubbed_gpu(monkeypatch):
    """The build child's GPU path, with the GPU, the build and the background builds stubbed:
    it times the build, self-tests both versions, and fails when one version fails."""
    from rwkv_peft.model import wkv_cuda, wkv_self_test

    _stub_gpu(monkeypatch)
    tested = []

    def stub_self_test(kernel, version, head_size, device):
        tested.append((version, head_size, str(device)))
        return None if version == 7 else "RWKV-6 kernel self-test failed on cuda:0, stub GPU (...)"

    monkeypatch.setattr(wkv_self_test, "self_test", stub_self_test)
    monkeypatch.setattr(wkv_cuda, "cuda_unavailable_reason",
                        lambda device, head_size, version: stub_self_test(None, version, head_size, device))

    class Build:  # a background build of another head size that succeeded
        returncode = 0

        def __init__(self, cmd, cwd, start_new_session):
            assert "load_extension(" in cmd[-1]

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Build)
    result = gpu_check.build_child()
    assert tested[:2] == [(7, 64, "cuda:0"), (6, 64, "cuda:0")]
    assert result["gpu"] == "stub GPU" and result["capability"] == [9, 0] and "build_s" in result
    assert result["self_test_v7"] == "passed" and result["self_test_v6"].startswith("RWKV-6 kernel self-test failed")
    assert result["background_builds"] == [0, 0]
    assert result["status"] == "failed: RWKV-6: RWKV-6 kernel self-test failed on cuda:0, stub GPU (...)"
    json.dumps(result)  # goes into gpu_check.json


def _stub_gpu(monkeypatch):
    from rwkv_peft.model import wkv_cuda, wkv_self_test

    for name, value in {"is_available": lambda: True, "current_device": lambda: 0,
                        "get_device_name": lambda d=None: "stub GPU", "get_device_capability": lambda d=None: (9, 0),
                        "synchronize": lambda d=None: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(wkv_cuda, "_toolchain_reason", lambda device, head_size: None)
    monkeypatch.setattr(wkv_cuda, "load_extension", lambda head_size, device=None: object())
    monkeypatch.setattr(wkv_self_test, "self_test", lambda kernel, version, head_size, device: None)
    monkeypatch.setattr(wkv_cuda, "cuda_unavailable_reason", lambda device, head_size, version: None)


def test_a_background_build_that_hangs_is_cut_at_the_step_deadline(monkeypatch):
    """Background builds (head sizes 32, 128) that never end, as behind a stale build lock: the
    build step reports them as timed out before its own cap instead of waiting for ever (and
    losing its result when the parent kills it at the cap)."""
    _stub_gpu(monkeypatch)
    started = []
    real_popen = gpu_check.subprocess.Popen

    def hanging_build(cmd, cwd, **kwargs):
        started.append(real_popen(["sleep", "60"], **kwargs))
        return started[-1]

    monkeypatch.setattr(gpu_check.subprocess, "Popen", hanging_build)
    t0 = time.monotonic()
    result = gpu_check.build_child(cap=gpu_check.REPORT_MARGIN + 2)
    assert time.monotonic() - t0 < 15
    assert result["background_builds"] == ["timed out", "timed out"]
    assert result["status"] == ("failed: the background build of head size 32 timed out; "
                                "the background build of head size 128 timed out")
    assert all(p.poll() is not None for p in started)  # killed, not left behind


def test_fla_core_alone_counts_as_flash_linear_attention(tmp_path, monkeypatch):
    """fla-core installs the `fla` module that bench_gpu.py imports; the env step must not
    report flash-linear-attention as missing then."""
    (tmp_path / "fla").mkdir()
    (tmp_path / "fla" / "__init__.py").write_text("")
    dist = tmp_path / "fla_core-0.6.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fla-core\nVersion: 0.6.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu_check.package_version("flash-linear-attention") is None  # only fla-core is there
    log = gpu_check.Log(tmp_path / "log")
    result = gpu_check.env_step(log)
    log.close()
    assert result["env"]["fla-core"] == "0.6.0"
    assert "flash-linear-attention" not in result["status"], result["status"]


def test_fla_rows_come_after_both_versions_own_rows(tmp_path):
    """fla's first call compiles and autotunes Triton kernels for an unknown time: it runs in its
    own step after the kernels step has timed our kernel and PyTorch path for WKV-7 and WKV-6."""
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    steps = list(gpu_check.STEPS)
    assert steps.index("kernels") < steps.index("fla")
    kernels, fla = (gpu_check.step_command(s, args, 60) for s in ("kernels", "fla"))
    assert kernels[kernels.index("--kernel-versions") + 1] == "7,6"
    assert kernels[kernels.index("--kernel-ops") + 1] == "cuda,torch"
    assert fla[fla.index("--kernel-ops") + 1] == "torch,fla"  # torch: the reference it is compared with
