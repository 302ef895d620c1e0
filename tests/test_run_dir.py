"""A run owns its directory and its settings, through the real commands and the real launcher:

- the ranks of one run decide its directory once, however far apart they start;
- one run per directory: a second run is refused naming the owner, the lock of a run that is
  gone is taken over, and plain runs started together need no port;
- --resume takes the run's settings from its args.json: flags that contradict them are refused
  in one line, the documented changes are made, and every `next:` hint works as printed.

The workspace is laid out as the repository root is for a user (train.py and merge.py at the
top, `python` and `torchrun` on PATH), so that each printed hint runs there exactly as printed.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_workspace import COMMON, ROOT, clean_env, losses, make_workspace

pytest.importorskip("deepspeed")

TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node=2"]


def workspace(d: Path) -> Path:
    make_workspace(d)
    for script in ("train.py", "merge.py"):
        (d / script).symlink_to(ROOT / script)
    bin_dir = d / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return workspace(tmp_path_factory.mktemp("run_dir"))


def env_for(work: Path, **extra) -> dict:
    env = clean_env()
    env["PATH"] = f"{work / 'bin'}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def command(work: Path, *argv, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """argv (a list) or a shell command line (one string, run as typed) in the workspace."""
    argv = ["bash", "-c", argv[0]] if len(argv) == 1 and isinstance(argv[0], str) else [str(a) for a in argv]
    return subprocess.run(argv, cwd=work, env=env_for(work, **env), capture_output=True, text=True, timeout=timeout)


def start(work: Path, *argv) -> subprocess.Popen:
    return subprocess.Popen([str(a) for a in argv], cwd=work, env=env_for(work), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def hints(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("next: ")]


def run_hint(work: Path, hint: str) -> subprocess.CompletedProcess:
    """The command a `next:` line names, typed into a shell exactly as printed."""
    return ok(command(work, hint.removeprefix("next: ")))


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen: {proc.poll()}")


def steps_saved(run: Path) -> bool:
    return (run / "checkpoints/latest").is_file()


def contents(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def script_cases(work: Path, cases: list) -> dict:
    """[name, script, args] cases through each command's main(argv), in one process
    (tests/script_cases.py): exit code, stderr and the paths each left behind."""
    (work / "cases.json").write_text(json.dumps(cases))
    ok(command(work, "python", ROOT / "tests/script_cases.py", "cases.json", "results.json"))
    results = json.loads((work / "results.json").read_text())
    for name in ("cases.json", "results.json"):
        (work / name).unlink()
    return results


# --- class 2: the ranks of one run share one directory -------------------------------------

RANK_STARTS = {  # case: (seconds each rank waits before it starts, continue by the printed hint)
    "rank 1 starts 1.5 s after rank 0": ("0,1.5", True),
    "rank 0 starts 1.5 s after rank 1": ("1.5,0", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RANK_STARTS)
def test_ranks_started_seconds_apart_write_one_run_directory(tmp_path, case):
    """No --proj_dir under torchrun: the default out/run-<time> is decided once, on rank 0, for
    every rank, so ranks that start in different seconds still write one run."""
    delays, continue_it = RANK_STARTS[case]
    work = workspace(tmp_path)
    proc = ok(command(work, *TORCHRUN, ROOT / "tests/delayed_ranks.py", delays, "train.py", *COMMON,
                      "--max_steps", "4", "--stop_at_step", "2"))
    runs = sorted((work / "out").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints/step-00000002").iterdir()) == [
        "mp_rank_00_model_states.pt", "trainer.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # both ranks' optimizer shards, in the one run
    assert json.loads((run / "args.json").read_text())["proj_dir"] == f"out/{run.name}"
    assert len(losses(run)) == 2 and not (run / "run.lock").exists()
    if continue_it:
        assert hints(proc) == [f"next: torchrun --standalone --nproc_per_node=2 train.py --resume --proj_dir "
                               f"out/{run.name}"]
        run_hint(work, hints(proc)[0])
        assert sorted((work / "out").iterdir()) == [run] and len(losses(run)) == 4
        assert json.loads((run / "summary.json").read_text())["segments"] == 2


def test_default_run_directories_started_in_one_second_differ(tmp_path, monkeypatch):
    from rwkv_peft.train import run_dir
    from rwkv_peft.train.args import TrainArgs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_dir.time, "strftime", lambda fmt: "run-20250101-000000")
    chosen = [run_dir.choose_proj_dir(TrainArgs(), claim=True) for _ in range(3)]
    assert [str(p) for p in chosen] == ["out/run-20250101-000000", "out/run-20250101-000000-2",
                                        "out/run-20250101-000000-3"]
    assert run_dir.choose_proj_dir(TrainArgs(dry_run=True)) == Path("out/run-20250101-000000")  # claims nothing


# --- class 3: one run per directory -----------------------------------------------------------

SECOND_RUNS = {  # case: (command, exit code: torchrun reports a failed worker as 1)
    "a new plain run": (["python", "train.py", *COMMON, "--max_steps", "4", "--proj_dir", "held"], 2),
    "a plain --resume": (["python", "train.py", *COMMON, "--proj_dir", "held", "--resume"], 2),
    "a new run under torchrun": ([*TORCHRUN, "train.py", *COMMON, "--max_steps", "4", "--proj_dir", "held"], 1),
}


@pytest.mark.slow
def test_a_held_directory_refuses_a_second_run_naming_its_owner(work):
    """While a torchrun run trains in held/, every second run into it stops at once with one
    error line naming the owner; the owner's files stay its own."""
    holder = start(work, *TORCHRUN, "train.py", *COMMON, "--max_steps", "100000", "--save_every", "2",
                   "--proj_dir", "held")
    try:
        wait_for(lambda: steps_saved(work / "held"), holder, "the first checkpoint")
        owner = json.loads((work / "held/run.lock").read_text())
        assert owner["host"] == socket.gethostname() and owner["processes"] == 2
        assert owner["command"].startswith("python train.py ") and "--proj_dir held" in owner["command"]
        os.kill(owner["pid"], 0)  # alive: rank 0 of the holder
        for case, (argv, code) in SECOND_RUNS.items():
            proc = command(work, *argv)
            assert proc.returncode == code, (case, proc.stderr[-3000:])
            assert errors(proc) == [f"error: --proj_dir held is in use by another run (pid {owner['pid']} on "
                                    f"{owner['host']}, started {owner['started']}: {owner['command']}, rank 0 of 2 "
                                    "processes); wait for it to end or stop it, or choose another --proj_dir"], \
                (case, proc.stderr[-3000:])
            assert "Traceback" not in proc.stderr.split("failed (exitcode")[0], case  # (torchrun adds its own)
        assert holder.poll() is None
    finally:
        os.killpg(holder.pid, signal.SIGINT)  # Ctrl-C: the holder saves and ends
        holder.communicate(timeout=300)
    steps = [json.loads(line)["step"] for line in (work / "held/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, none interleaved
    assert json.loads((work / "held/args.json").read_text())["max_steps"] == 100000
    assert not (work / "held/run.lock").exists() and not (work / "held/summary.json").exists()


@pytest.mark.slow
def test_a_killed_runs_directory_resumes_without_cleanup(work):
    """SIGKILL leaves run.lock behind; nobody holds it, so --resume takes the directory over."""
    run = work / "killed"
    proc = start(work, "python", "train.py", *COMMON, "--max_steps", "100000", "--save_every", "2", "--proj_dir",
                 run.name)
    wait_for(lambda: steps_saved(run), proc, "the first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    dead = json.loads((run / "run.lock").read_text())["pid"]
    step = int((run / "checkpoints/latest").read_text().removeprefix("step-"))
    resumed = ok(command(work, "python", "train.py", *COMMON, "--proj_dir", run.name, "--resume", "--max_steps",
                         step + 2))
    assert f"note: {run.name} was left locked by a run that is gone (pid {dead} on" in resumed.stdout
    assert f"resumed from {run.name}/checkpoints/step-{step:08d} at step {step}" in resumed.stdout
    assert len(losses(run)) == step + 2 and not (run / "run.lock").exists()


def lock_of_another_host(d: Path) -> None:  # its run is gone; nobody holds the lock
    (d / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "", "command": ""}))


def unsaved_run(d: Path) -> None:  # killed while training, before its first checkpoint
    (d / "args.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    lock_of_another_host(d)


DIRECTORY_STATES = {  # case: (what puts it in the directory (None: a real finished run), the error line, or
                      #        None where the new run trains there)
    "a finished run": (None, "--proj_dir {d} already holds a run (its checkpoints/latest is step-00000002); "
                             "continue it with --resume, or choose another --proj_dir for a new run"),
    "the lock of a run on another host that is gone": (lock_of_another_host, None),
    "an empty lock (a run killed as it took it)": (lambda d: (d / "run.lock").write_text(""), None),
    "a run killed before its first checkpoint": (unsaved_run, None),
}


@pytest.mark.slow
def test_what_a_directory_holds_decides_whether_a_new_run_starts_there(work):
    """A new run (no --resume) never writes into a saved run; a lock nobody holds is no obstacle."""
    dirs = {case: work / "states" / case.replace(" ", "-") for case in DIRECTORY_STATES}
    ok(command(work, "python", "train.py", *COMMON, "--max_steps", "2", "--proj_dir", dirs["a finished run"]))
    for case, (setup, _) in DIRECTORY_STATES.items():
        if setup:
            dirs[case].mkdir(parents=True)
            setup(dirs[case])
    before = {case: contents(d) for case, d in dirs.items()}
    results = script_cases(work, [[case, "train", [*COMMON, "--max_steps", "2", "--proj_dir",
                                                   str(d.relative_to(work))]] for case, d in dirs.items()])
    for case, (_, error) in DIRECTORY_STATES.items():
        d, out = dirs[case], results[case]
        if error:
            lines = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
            assert out["code"] == 2 and lines == ["error: " + error.format(d=d.relative_to(work))], \
                (case, out["stderr"][-2000:])
            assert out["new"] == [] and out["gone"] == [] and contents(d) == before[case], case
        else:
            assert out["code"] == 0, (case, out["stderr"][-2000:])
            assert len(losses(d)) == 2 and (d / "summary.json").exists() and not (d / "run.lock").exists(), case


RUNS_TOGETHER = {  # case: environment of one of the runs started at the same moment
    "first": {},
    "second": {},
    "MASTER_PORT names a busy port": {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None},
}


@pytest.mark.slow
def test_plain_runs_started_together_need_no_port(tmp_path):
    """A plain `python train.py` is a world of one: its process group needs no port, so runs
    started at the same moment (or with a busy MASTER_PORT left in the environment) never meet
    on one, and each gets its own out/run-<time>."""
    work = workspace(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        procs = {}
        for case, env in RUNS_TOGETHER.items():
            env = {k: str(busy.getsockname()[1]) if v is None else v for k, v in env.items()}
            procs[case] = subprocess.Popen(["python", "train.py", *COMMON, "--max_steps", "2"], cwd=work,
                                           env=env_for(work, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
        outcomes = {case: (p.wait(timeout=600), p.stderr.read()) for case, p in procs.items()}
    for case, (code, stderr) in outcomes.items():
        assert code == 0 and "Traceback" not in stderr, (case, stderr[-3000:])
    runs = sorted((work / "out").iterdir())
    assert len(runs) == len(RUNS_TOGETHER), runs
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
        assert json.loads((run / "args.json").read_text())["proj_dir"] == f"out/{run.name}"


# --- class 4: --resume knows its run -------------------------------------------------------

HINT_RUNS = {  # case: (directory, the run's flags, stopped at step 3, then compared with an uninterrupted run,
               #        then continued past its end)
    "state tuning": ("state", ["--peft", "none", "--train_parts", "state", "--max_steps", "6"], True, True, True),
    "the default method": ("bone", ["--max_steps", "6"], True, False, False),  # 6 steps, not an epoch's 64
    "full training": ("full", ["--peft", "full", "--max_steps", "2"], False, False, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HINT_RUNS)
def test_every_next_hint_works_exactly_as_printed(work, case):
    """Each `next:` line the trainer prints, typed into a shell as printed, does what it says."""
    run, flags, stop, compare, extend = HINT_RUNS[case]
    proc = ok(command(work, "python", "train.py", *COMMON, *flags, *(["--stop_at_step", "3"] * stop),
                      "--proj_dir", run))
    if stop:
        assert hints(proc) == [f"next: python train.py --resume --proj_dir {run}"]
        resume = hints(proc)[0]
        proc = run_hint(work, resume)  # the run's own settings: nothing but the directory given
        assert "resumed from" in proc.stdout and len(losses(work / run)) == 6
        if compare:
            ok(command(work, "python", "train.py", *COMMON, *flags, "--proj_dir", f"{run}-straight"))
            assert losses(work / run) == losses(work / f"{run}-straight")
        if extend:  # once complete, the hint says how to train longer, and that works too
            again = run_hint(work, resume)
            assert "already complete (6 of 6 steps); nothing was changed" in again.stdout
            assert hints(again) == [f"next: python train.py --resume --proj_dir {run} --max_steps 12"]
            proc = run_hint(work, hints(again)[0])
            assert len(losses(work / run)) == 12
    final = f"{run}/{'model.pth' if run == 'full' else 'adapter.safetensors'}"
    assert hints(proc) == [f"next: python -m rwkv_peft.run --model {final} --tokenizer tok.json" if run == "full"
                           else f"next: python merge.py --adapter {final}"]
    run_hint(work, hints(proc)[0])


@pytest.mark.slow
def test_an_early_stopped_runs_hint_trains_on(work):
    """Validation on text the training makes less likely stops the run early; resuming it says
    so, and its `next:` line (a resume with --early_stop 0) trains on to the end."""
    words = "the cat sat on a mat and saw one red bird fly".split()
    (work / "reversed.jsonl").write_text(json.dumps({"text": " ".join(words[::-1] * 3)}) + "\n")
    ok(command(work, "python", "train.py", *COMMON, "--max_steps", "6", "--val_file", "reversed.jsonl",
               "--eval_every", "1", "--early_stop", "1", "--proj_dir", "early"))
    summary = json.loads((work / "early/summary.json").read_text())
    assert summary["early_stopped"] and summary["steps"] < 6
    again = ok(command(work, "python", "train.py", "--resume", "--proj_dir", "early"))
    assert f"already stopped early at step {summary['steps']} of 6" in again.stdout
    assert hints(again) == ["next: python train.py --resume --proj_dir early --early_stop 0"]
    run_hint(work, hints(again)[0])
    assert len(losses(work / "early")) == 6


@pytest.fixture(scope="module")
def stopped(work):
    """A LoRA run stopped at step 3 of 6, and copies of it with a missing or broken args.json."""
    ok(command(work, "python", "train.py", *COMMON, "--peft", "lora", "--max_steps", "6", "--stop_at_step", "3",
               "--proj_dir", "lora"))
    for name, args_json in (("lora-no-args", None), ("lora-bad-json", "{'peft': "),
                            ("lora-bad-type", "retype")):
        shutil.copytree(work / "lora", work / name)
        if args_json is None:
            (work / name / "args.json").unlink()
        elif args_json == "retype":
            settings = json.loads((work / name / "args.json").read_text())
            (work / name / "args.json").write_text(json.dumps({**settings, "lora_r": "eight"}))
        else:
            (work / name / "args.json").write_text(args_json)
    shutil.copy(work / "base.pth", work / "other.pth")
    return work


REFUSED = {  # case: (flags after the run's own and --resume, the error line's text)
    "another method": (["--peft", "bone"], "which this flag contradicts: --peft bone (the run: lora); drop it"),
    "another rank": (["--lora_r", "4"], "which this flag contradicts: --lora_r 4 (the run: 8)"),
    "another --train_parts": (["--train_parts", "state"], "--train_parts state (the run: none)"),
    "another base": (["--load_model", "other.pth"], "--load_model other.pth (the run: base.pth)"),
    "another ZeRO stage": (["--strategy", "deepspeed_stage_2"],
                           "--strategy deepspeed_stage_2 (the run: deepspeed_stage_1)"),
    "several at once": (["--peft", "bone", "--ctx_len", "16", "--lr_init", "1"],
                        "which these flags contradict: --ctx_len 16 (the run: 32), --peft bone (the run: lora), "
                        "--lr_init 1.0 (the run: 0.03); drop them, or start a new run in another --proj_dir. "
                        "A resume may change only --max_steps, --epochs, --save_every"),
    "a --max_steps before the step reached": (["--max_steps", "2"],
                                              "--max_steps 2 ends before step 3, where the run in lora stands"),
    "a checkpoint of another run": (["--resume", "lora/checkpoints/step-00000003", "--proj_dir", "lora-no-args"],
                                    "is a checkpoint of the run in lora, not of --proj_dir lora-no-args"),
    "args.json missing": (["--proj_dir", "lora-no-args"],
                          "--resume: lora-no-args/args.json is missing, so the settings of the run in lora-no-args "
                          "are unknown; restore it, or start a new run in another --proj_dir"),
    "args.json not JSON": (["--proj_dir", "lora-bad-json"], "--resume: lora-bad-json/args.json is not valid JSON"),
    "args.json of a wrong type": (["--proj_dir", "lora-bad-type"],
                                  'lora-bad-type/args.json gives lora_r the value "eight", which is not an int'),
}


@pytest.mark.slow
def test_resume_refuses_flags_that_contradict_the_run(stopped):
    work = stopped
    runs = ("lora", "lora-no-args", "lora-bad-json", "lora-bad-type")
    before = {run: contents(work / run) for run in runs}
    results = script_cases(work, [[case, "train", [*COMMON, "--peft", "lora", "--proj_dir", "lora", "--resume", *flags]]
                                  for case, (flags, _) in REFUSED.items()])
    for case, (_, expected) in REFUSED.items():
        out = results[case]
        lines = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
        assert out["code"] == 2 and len(lines) == 1 and expected in lines[0], (case, out["stderr"][-2000:])
        assert "Traceback" not in out["stderr"] and out["new"] == [] and out["gone"] == [], case
    assert {run: contents(work / run) for run in runs} == before


ALLOWED = {  # case: (flags after the run's own and --resume, steps at the end, the log's list of changes)
    "a longer --max_steps": (["--max_steps", "8"], 8, "changed: --max_steps 6 -> 8"),
    "saving cadence, and the base spelled another way": (["--load_model", "./base.pth", "--save_every", "1",
                                                          "--keep_last", "1"], 6,
                                                         "changed: --save_every 0 -> 1, --keep_last 2 -> 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ALLOWED)
def test_resume_makes_the_documented_changes(stopped, case):
    flags, steps, changes = ALLOWED[case]
    work, run = stopped, "lora-" + case.split()[1]
    shutil.copytree(stopped / "lora", work / run)
    proc = ok(command(work, "python", "train.py", *COMMON, "--peft", "lora", "--proj_dir", run, "--resume", *flags))
    assert f"continuing the run in {run} with its settings ({run}/args.json); {changes}" in proc.stdout
    assert len(losses(work / run)) == steps
    settings = json.loads((work / run / "args.json").read_text())
    assert settings["max_steps"] == steps and settings["lora_r"] == 8 and settings["proj_dir"] == run
    if "--keep_last" in flags:
        assert sorted(p.name for p in (work / run / "checkpoints").glob("step-*")) == ["step-00000006"]
