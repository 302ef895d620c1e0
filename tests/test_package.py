"""`pip install .` into a fresh virtual environment gives working commands from any directory,
the embedded demo included (it travels as package data)."""

import json
import subprocess
import sys

import pytest

from tiny_workspace import ROOT, clean_env

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow  # end-to-end runs: python -m pytest -m 'not slow' skips them


def test_installed_package_trains_merges_and_chats_from_another_directory(tmp_path):
    # The venv sees this interpreter's site-packages for torch, DeepSpeed and the rest (a copy
    # of torch would cost minutes and GBs); the package itself must come from the install.
    # --without-pip: the venv's bundled setuptools is too old to build a wheel; the outer pip
    # and its setuptools build this project, with no download.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = clean_env()
    env.pop("PYTHONPATH")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--disable-pip-version-check", str(ROOT)], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import rwkv_peft; print(rwkv_peft.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(venv) in where  # the installed copy, not the checkout

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(command, *args):
        proc = subprocess.run([str(venv / "bin" / command), *args], capture_output=True, text=True, env=env,
                              cwd=elsewhere, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    # every "next:" hint names an installed command: the checkout's train.py or merge.py are not there
    trained = run("rwkv-peft-train", "--max_steps", "3", "--proj_dir", "out/run")
    assert json.loads((elsewhere / "out/run/summary.json").read_text())["steps"] == 3
    assert "next: rwkv-peft-merge --adapter out/run/adapter.safetensors" in trained.stdout
    merged = run("rwkv-peft-merge")
    assert "verify: OK" in merged.stdout and "next: rwkv-peft-chat --model " in merged.stdout
    reply = run("rwkv-peft-chat", "--prompt", "Hello", "--temperature", "0", "--max_tokens", "4")
    assert "out/run/merged.pth" in reply.stderr
    assert "--model" in run("rwkv-peft-eval", "--help").stdout
    assert "next: fine-tune it with `rwkv-peft-train --load_model" in run("rwkv-peft-run", "--tokens", "2").stdout

    # each command's usage and error lines name it as it was started
    for command in ("rwkv-peft-train", "rwkv-peft-merge", "rwkv-peft-chat", "rwkv-peft-eval", "rwkv-peft-run"):
        proc = subprocess.run([str(venv / "bin" / command), "--no_such_flag"], capture_output=True, text=True,
                              env=env, cwd=elsewhere, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith(f"usage: {command} "), proc.stderr[-1000:]
        assert f"{command}: error: unrecognized arguments: --no_such_flag" in proc.stderr
        assert ".py" not in proc.stderr.splitlines()[0]
