"""train.py started and stopped the ways users start and stop it: through the deepspeed
launcher, and with Ctrl-C while its output goes through a pipe whose reader is gone."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tiny_workspace import COMMON, ROOT, clean_env, losses, make_workspace, run_script

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m 'not slow' skips them


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("launchers"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_with_two_processes_equals_one_process(work):
    """`deepspeed train.py` passes --local_rank=N to every process; the run must accept it."""
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed package installs the `deepspeed` launcher"
    args = [*COMMON, "--peft", "lora", "--max_steps", "4"]
    run_script(work, "train.py", *args, "--micro_bsz", "2", "--proj_dir", "ds-one")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "train.py"),
                           *args, "--micro_bsz", "1", "--proj_dir", "ds-two"], cwd=work, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unrecognized arguments" not in proc.stderr
    torch.testing.assert_close(torch.tensor(losses(work / "ds-two")), torch.tensor(losses(work / "ds-one")),
                               rtol=1e-4, atol=1e-5)
    # per-run messages come once, from rank 0; DeepSpeed's notices stay hidden without --debug
    assert proc.stdout.count("trainable ") == 1 and proc.stdout.count("wrote ") == 1
    assert "FutureWarning" not in proc.stdout + proc.stderr


def wait_for_steps(run_dir, n, proc, timeout=240):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {n}")


def test_ctrl_c_saves_even_when_the_pipe_reader_is_gone(work):
    """`python train.py 2>&1 | tee log`, then Ctrl-C: tee dies first, and the next write to the
    pipe fails. The run must still save its checkpoint and exit 130."""
    args = [*COMMON, "--peft", "bone", "--proj_dir", "piped"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--max_steps", "400"], cwd=work,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_steps(work / "piped", 3, proc)
    proc.stdout.close()  # the reader (tee) exits...
    proc.send_signal(signal.SIGINT)  # ...and the same Ctrl-C reaches the trainer
    assert proc.wait(timeout=240) == 130
    step = len(losses(work / "piped"))
    assert (work / "piped/checkpoints/latest").read_text() == f"step-{step:08d}"
    resumed = run_script(work, "train.py", *args, "--max_steps", str(step + 1), "--resume")
    assert f"at step {step}" in resumed.stdout and len(losses(work / "piped")) == step + 1


def test_ctrl_c_under_torchrun_saves_once_with_one_message(work):
    """The terminal signals the whole process group: torchrun and both workers. torchrun
    forwards the signal again; that must not count as a second (abort) Ctrl-C."""
    args = [*COMMON, "--peft", "bone", "--proj_dir", "torchrun-stop", "--max_steps", "400"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *args], cwd=work,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_steps(work / "torchrun-stop", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    step = len(losses(work / "torchrun-stop"))
    assert (work / "torchrun-stop/checkpoints/latest").read_text() == f"step-{step:08d}"
    assert out.count("interrupted: saved a checkpoint") == 1 and err.count("stopped") == 1, out + err
