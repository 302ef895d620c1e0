"""A command's files (issue 25, classes 1, 5, 7 and 8): outputs never overwrite inputs; an
operating-system failure or a signal during a write is one line and leaves nothing half-written;
non-finite tensors are refused where they are loaded; tampered or foreign adapter files are one
line, not a Python error.

Each class has a table of real command lines, run through the commands' own main() in one
process (tests/script_cases.py): the exit code, the one `error:` line, and the workspace's
files before and after (nothing new, gone or changed unless the case says so). Cases that need
a process of their own (a full disk, a file-size limit, SIGTERM, Ctrl-C and SIGKILL during a
write, a training run) follow the tables.
"""

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from official_layout import rwkv6_state_dict
from rwkv_peft import load_model
from rwkv_peft.peft.adapt import plan_adapters, prepare_peft
from rwkv_peft.peft.adapter_file import _sampled_fingerprint, describe_base, save_adapter
from tiny_workspace import COMMON, ROOT, VOCAB, clean_env, make_workspace, run_cases

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")


def adapter_for(base_sd, path, base_path, method=("bone", {"r": 16}), parts=(), edit=None, base_record=None):
    model = load_model(base_sd)
    methods, trained = prepare_peft(model, plan_adapters(model, [], method) if method else {}, parts)
    if edit:
        edit(methods, trained)
    record = base_record if base_record is not None else describe_base(base_sd, model.config, base_path)
    save_adapter(path, methods, trained, record)


def tamper(src: Path, dst: Path, change) -> None:
    """A copy of adapter src whose rwkv_peft config went through change(config)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        config = json.loads(f.metadata()["rwkv_peft"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    changed = change(config)
    save_file(tensors, str(dst), metadata={"rwkv_peft": changed if isinstance(changed, str) else json.dumps(changed)})


def alternating(n, value):
    return value * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("files"))
    base = torch.load(d / "base.pth", weights_only=True)
    C = base["emb.weight"].shape[1]
    adapter_for(base, d / "good.safetensors", d / "base.pth")
    adapter_for(base, d / "state.safetensors", d / "base.pth", method=None, parts=("state",))
    # class 1: other names of the base, and runs whose outputs would be their inputs
    os.symlink("base.pth", d / "link.pth")
    os.link(d / "base.pth", d / "hard.pth")
    torch.save({"blocks.0.att.key.lora_A": torch.ones(4, C), "blocks.0.att.key.lora_B": torch.ones(C, 4)},
               d / "peft-lora.pth")
    torch.save({"blocks.0.att.key.init_lora_A": torch.ones(4, C), "blocks.0.att.key.init_lora_B": torch.ones(C, 4)},
               d / "init_pissa.pth")
    (d / "fullrun").mkdir()
    shutil.copy(d / "base.pth", d / "fullrun/model.pth")
    (d / "keeps-data").mkdir()
    os.symlink("../text.jsonl", d / "keeps-data/metrics.jsonl")
    (d / "run4/checkpoints").mkdir(parents=True)
    shutil.copy(d / "base.pth", d / "run4/checkpoints/base.pth")
    os.symlink("text.jsonl", d / "linked.bin")
    os.symlink("tok.json", d / "tokpair.idx")
    # class 5: directories and a FIFO where files go
    (d / "outdir.pth").mkdir()
    (d / "somedir").mkdir()
    (d / "outdir.gguf").mkdir()
    os.mkfifo(d / "fifo.pth")
    (d / "pair2.idx").mkdir()
    (d / "proj5/adapter.safetensors").mkdir(parents=True)
    # class 7: non-finite tensors, and finite ones that overflow
    nan_layer = dict(base, **{"blocks.1.att.key.weight": base["blocks.1.att.key.weight"].clone()})
    nan_layer["blocks.1.att.key.weight"][3, 5] = float("nan")
    torch.save(nan_layer, d / "nan-layer.pth")
    inf_norm = dict(base, **{"ln_out.weight": torch.full_like(base["ln_out.weight"], float("inf"))})
    torch.save(inf_norm, d / "inf-norm.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in nan_layer.items()}, str(d / "nan-layer.safetensors"))
    H = C // 16
    states = {f"blocks.{i}.att.time_state": torch.zeros(H, 16, 16) for i in range(2)}
    states["blocks.1.att.time_state"][0, 0, 0] = float("nan")
    torch.save(states, d / "nan-state.pth")
    adapter_for(base, d / "nan-adapter.safetensors", d / "base.pth",
                edit=lambda methods, _: methods["blocks.0.att.key"].bone.data.fill_(float("inf")))
    overflow = dict(base, **{"emb.weight": base["emb.weight"].clone()})
    overflow["emb.weight"][VOCAB["red"]] = alternating(C, 1e30)
    torch.save(overflow, d / "overflow.pth")
    half = {k: v.half() for k, v in base.items()}
    torch.save(half, d / "half.pth")

    def huge(methods, _):  # finite factors whose product, 320000, is past fp16's largest number
        methods["blocks.0.att.key"].lora_A.data.fill_(200.0)
        methods["blocks.0.att.key"].lora_B.data.fill_(200.0)
    adapter_for(half, d / "huge-delta.safetensors", d / "half.pth", method=("lora", {"r": 8, "alpha": 8.0}), edit=huge)
    # class 8: tampered configs, foreign keys, another RWKV version, a base that differs in one value
    good = d / "good.safetensors"
    tamper(good, d / "layers-string.safetensors", lambda c: dict(c, layers="bone"))
    tamper(good, d / "rank-string.safetensors", lambda c: dict(c, layers={
        m: dict(s, r="sixteen") for m, s in c["layers"].items()}))
    tamper(good, d / "rank-float.safetensors", lambda c: dict(c, layers={
        m: dict(s, r=16.5) for m, s in c["layers"].items()}))
    tamper(good, d / "base-string.safetensors", lambda c: dict(c, base="base.pth"))
    tamper(good, d / "parts-table.safetensors", lambda c: dict(c, parts={"a": 1}))
    tamper(good, d / "method-unknown.safetensors", lambda c: dict(c, layers={
        m: dict(s, method="dora") for m, s in c["layers"].items()}))
    tamper(good, d / "not-json.safetensors", lambda c: "{layers: bone")
    tamper(good, d / "quant-list.safetensors", lambda c: dict(c, quant=["nf4"]))
    tamper(good, d / "fingerprint-version.safetensors", lambda c: dict(c, base=dict(c["base"], fingerprint_version=9)))
    torch.save({1: torch.zeros(16, C), "blocks.0.att.key.bone": torch.zeros(16, C)}, d / "int-key.pth")
    v6 = rwkv6_state_dict(vocab=len(VOCAB), n_layer=2, n_embd=C, head_size=16, seed=3)
    torch.save(v6, d / "base6.pth")
    adapter_for(v6, d / "adapter6.safetensors", d / "base6.pth")
    torch.save({"blocks.0.att.gate.bone": torch.zeros(16, C)}, d / "peft6.pth")
    differs = dict(base, **{"blocks.0.ffn.key.weight": base["blocks.0.ffn.key.weight"].clone()})
    differs["blocks.0.ffn.key.weight"].view(-1)[1] += 0.5  # between the old fingerprint's samples
    assert _sampled_fingerprint(differs) == _sampled_fingerprint(base)
    torch.save(differs, d / "differs.pth")
    # written before fingerprint_version 2: the sampled fingerprint, no version field
    old_record = {k: v for k, v in describe_base(base, load_model(base).config, d / "base.pth").items()
                  if k != "fingerprint_version"} | {"fingerprint": _sampled_fingerprint(base)}
    adapter_for(base, d / "old-format.safetensors", d / "base.pth", base_record=old_record)
    return d


def check_refused(out, expected, new=()):
    """Exit 2, one `error:` line holding expected, no traceback; no file new (but new), gone or changed."""
    errors = [line for line in out["stderr"].splitlines() if line.startswith("error:")]
    assert out["code"] == 2, (out["code"], out["stderr"][-3000:])
    assert len(errors) == 1 and expected in errors[0], out["stderr"][-3000:]
    assert "Traceback" not in out["stderr"]
    assert out["new"] == sorted(new) and out["gone"] == [] and out["changed"] == [], out


T = ["--max_steps", "2"]  # a training case: COMMON flags first

# --- class 1: an output is never one of the inputs (by inode: symlinks, hard links, other spellings)
SAME = {
    "state_only over its --base": ("merge", ["--state_only", "--adapter", "state.safetensors", "--base", "base.pth",
                                             "--output", "base.pth"], "--output base.pth is the same file as --base"),
    "state_only over its adapter": ("merge", ["--state_only", "--adapter", "state.safetensors", "--output",
                                              "state.safetensors"], "is the same file as --adapter"),
    "state_only over the recorded base": ("merge", ["--state_only", "--adapter", "state.safetensors", "--output",
                                                    "link.pth"], "is the same file as the base the adapter was"),
    "merge over a symlink to the base": ("merge", ["--base", "base.pth", "--adapter", "good.safetensors", "--output",
                                                   "link.pth"], "--output link.pth is the same file as --base"),
    "merge over a hard link of the base": ("merge", ["--base", "base.pth", "--adapter", "good.safetensors",
                                                     "--output", "hard.pth"], "--output hard.pth is the same file as"),
    "merge over ./base.pth": ("merge", ["--adapter", "good.safetensors", "--output", "./base.pth"],
                              "--output ./base.pth is the same file as --base"),
    "merge over its --pissa_init": ("merge", ["--base", "base.pth", "--adapter", "peft-lora.pth", "--pissa_init",
                                              "init_pissa.pth", "--output", "./init_pissa.pth"],
                                    "is the same file as --pissa_init"),
    "eval --json over its data": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json", "--data",
                                                     "chat.jsonl", "--json", "./chat.jsonl"],
                                  "--json ./chat.jsonl is the same file as --data"),
    "eval --json over its model": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json", "--data",
                                                      "chat.jsonl", "--json", "hard.pth"],
                                   "is the same file as --model"),
    "prepare over its input": ("rwkv_peft/data/prepare", ["text.jsonl", "linked", "--tokenizer", "tok.json"],
                               "output linked.bin is the same file as input"),
    "prepare over its tokenizer": ("rwkv_peft/data/prepare", ["text.jsonl", "tokpair", "--tokenizer", "tok.json"],
                                   "output tokpair.idx is the same file as --tokenizer"),
    "train over its --load_model": ("train", [*COMMON, *T, "--peft", "full", "--load_model", "fullrun/model.pth",
                                              "--proj_dir", "fullrun"],
                                    "--proj_dir fullrun: the run's model.pth fullrun/model.pth is the same file as "
                                    "--load_model"),
    "train over its --data_file": ("train", [*COMMON, *T, "--data_file", "keeps-data/metrics.jsonl", "--proj_dir",
                                             "keeps-data"],
                                   "the run's metrics.jsonl keeps-data/metrics.jsonl is the same file as --data_file"),
    "train with an input in checkpoints/": ("train", [*COMMON, *T, "--load_model", "run4/checkpoints/base.pth",
                                                      "--proj_dir", "run4"], "lies in run4/checkpoints"),
}

# --- class 5: what the operating system would refuse, refused before the work starts
OS = {
    "merge --output a directory": ("merge", ["--adapter", "good.safetensors", "--output", "outdir.pth"],
                                   "--output outdir.pth is a directory"),
    # (a name without suffix is a Hugging Face directory: merge.py --format hf)
    "merge --output a directory named .gguf": ("merge", ["--adapter", "good.safetensors", "--output", "outdir.gguf"],
                                               "--output outdir.gguf is a directory"),
    "merge --output a FIFO": ("merge", ["--adapter", "good.safetensors", "--output", "fifo.pth"],
                              "fifo.pth exists and is not a regular file"),
    "merge into a missing directory": ("merge", ["--adapter", "good.safetensors", "--output", "nodir/m.pth"],
                                       "directory nodir does not exist; create it (mkdir -p nodir)"),
    "state_only --output a directory": ("merge", ["--state_only", "--adapter", "state.safetensors", "--output",
                                                  "outdir.pth"], "--output outdir.pth is a directory"),
    "eval --json into a missing directory": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json",
                                                                "--data", "chat.jsonl", "--json", "nodir/r.json"],
                                             "--json nodir/r.json: directory nodir does not exist"),
    "eval --json a directory": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json", "--data",
                                                   "chat.jsonl", "--json", "somedir"], "--json somedir is a directory"),
    "prepare with .idx a directory": ("rwkv_peft/data/prepare", ["text.jsonl", "pair2", "--tokenizer", "tok.json"],
                                      "pair2.idx is a directory"),
    "prepare into a missing directory": ("rwkv_peft/data/prepare", ["text.jsonl", "nodir/pair", "--tokenizer",
                                                                    "tok.json"], "directory nodir does not exist"),
    "train where an output is a directory": ("train", [*COMMON, *T, "--proj_dir", "proj5"],
                                             "proj5/adapter.safetensors is a directory"),
}

# --- class 7: NaN and Inf refused where tensors are loaded, naming the tensor; overflow said
FINITE = {
    "train on a base with a NaN layer": ("train", [*COMMON, *T, "--load_model", "nan-layer.pth"],
                                         "checkpoint nan-layer.pth: tensor 'blocks.1.att.key.weight' holds nan at "
                                         "[3, 5]"),
    "chat on a base with a NaN layer": ("demo/chat", ["--model", "nan-layer.pth", "--tokenizer", "tok.json", "--prompt",
                                                      "hi"], "tensor 'blocks.1.att.key.weight' holds nan"),
    "chat on a NaN safetensors base": ("demo/chat", ["--model", "nan-layer.safetensors", "--tokenizer", "tok.json",
                                                     "--prompt", "hi"], "tensor 'blocks.1.att.key.weight' holds nan"),
    "chat with an Inf norm weight": ("demo/chat", ["--model", "inf-norm.pth", "--tokenizer", "tok.json", "--prompt",
                                                   "hi"], "tensor 'ln_out.weight' holds inf at [0] (64 of its 64"),
    "chat with a NaN --state": ("demo/chat", ["--model", "base.pth", "--tokenizer", "tok.json", "--state",
                                              "nan-state.pth", "--prompt", "hi"],
                                "state file nan-state.pth: tensor 'blocks.1.att.time_state' holds nan at [0, 0, 0]"),
    "eval of a NaN layer": ("rwkv_peft/eval", ["--model", "nan-layer.pth", "--tokenizer", "tok.json", "--data",
                                               "chat.jsonl"], "tensor 'blocks.1.att.key.weight' holds nan"),
    "merge of a NaN adapter": ("merge", ["--adapter", "nan-adapter.safetensors", "--output", "m.pth"],
                               "adapter nan-adapter.safetensors: tensor 'blocks.0.att.key.bone' holds inf"),
    "merge into a NaN base": ("merge", ["--adapter", "good.safetensors", "--base", "nan-layer.pth", "--output",
                                        "m.pth"],
                              "tensor 'blocks.1.att.key.weight' holds nan"),
    "merge that overflows, --no_verify": ("merge", ["--adapter", "huge-delta.safetensors", "--no_verify", "--output",
                                                    "m.pth"], "the merge of huge-delta.safetensors into "),
    "eval whose loss overflows": ("rwkv_peft/eval", ["--model", "overflow.pth", "--tokenizer", "tok.json", "--data",
                                                     "chat.jsonl", "--json", "overflow.json"],
                                  "the held-out loss of overflow.pth is nan"),
}

# --- class 8: tampered or foreign adapters: one line naming the field or the versions
FOREIGN = {
    "layers is a string": ("merge", ["--adapter", "layers-string.safetensors"],
                           "malformed rwkv_peft config ('layers' must be a table of layer -> settings, got \"bone\")"),
    "rank is a string": ("merge", ["--adapter", "rank-string.safetensors"],
                         "r must be a positive whole number, got \"sixteen\""),
    "rank is a fraction": ("merge", ["--base", "base.pth", "--adapter", "rank-float.safetensors"],
                           "r must be a positive whole number, got 16.5"),
    "base record is a string": ("merge", ["--base", "base.pth", "--adapter", "base-string.safetensors"],
                                "'base' must be a table"),
    "parts is a table": ("merge", ["--base", "base.pth", "--adapter", "parts-table.safetensors"],
                         "'parts' must be a list of tensor names"),
    "unknown method": ("merge", ["--base", "base.pth", "--adapter", "method-unknown.safetensors"],
                       "method must be one of lora, pissa, bone, bat, got \"dora\""),
    "config is not JSON": ("merge", ["--base", "base.pth", "--adapter", "not-json.safetensors"],
                           "malformed rwkv_peft config (not valid JSON"),
    "quant is a list": ("merge", ["--base", "base.pth", "--adapter", "quant-list.safetensors"],
                        "'quant' must be a table, got list"),
    "unknown fingerprint version": ("merge", ["--adapter", "fingerprint-version.safetensors"],
                                    "base fingerprint_version must be one of 1, 2, got 9"),
    "eval of a tampered adapter": ("rwkv_peft/eval", ["--model", "base.pth", "--tokenizer", "tok.json", "--adapter",
                                                      "rank-string.safetensors", "--data", "chat.jsonl"],
                                   "r must be a positive whole number"),
    "RWKV-PEFT adapter with a non-string key": ("merge", ["--base", "base.pth", "--adapter", "int-key.pth"],
                                                "adapter int-key.pth: key 1 is not a tensor name (it is of type int)"),
    "RWKV-6 adapter on an RWKV-7 base": ("merge", ["--base", "base.pth", "--adapter", "adapter6.safetensors"],
                                         "adapter6.safetensors was trained on an RWKV-6 model, but base base.pth is "
                                         "RWKV-7"),
    "RWKV-6 RWKV-PEFT adapter on an RWKV-7 base": ("merge", ["--base", "base.pth", "--adapter", "peft6.pth"],
                                                   "peft6.pth has the layers of an RWKV-6 model, but base base.pth is "
                                                   "RWKV-7"),
    "chat with an RWKV-6 adapter on RWKV-7": ("demo/chat", ["--model", "base.pth", "--tokenizer", "tok.json",
                                                            "--adapter", "adapter6.safetensors", "--prompt", "hi"],
                                              "was trained on an RWKV-6 model, but base base.pth is RWKV-7"),
    "a base that differs in one value": ("merge", ["--base", "differs.pth", "--adapter", "good.safetensors",
                                                   "--output", "m.pth"], "was trained on a different base"),
}


@pytest.fixture(scope="module")
def outcomes(work, tmp_path_factory):
    cases = {**SAME, **OS, **FINITE, **FOREIGN}
    return run_cases(work, [(name, script, args) for name, (script, args, *_) in cases.items()],
                     files=tmp_path_factory.mktemp("cases"), timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("case", SAME)
def test_an_output_that_is_an_input_is_refused(outcomes, case):
    check_refused(outcomes[case], SAME[case][2])


@pytest.mark.parametrize("case", OS)
def test_what_the_os_would_refuse_is_refused_first(outcomes, case):
    check_refused(outcomes[case], OS[case][2])
    if OS[case][0] == "rwkv_peft/eval":
        assert outcomes[case]["stdout"] == ""  # before the evaluation, not after it


@pytest.mark.parametrize("case", FINITE)
def test_non_finite_tensors_are_refused_and_named(outcomes, case, work):
    new = ["overflow.json"] if case == "eval whose loss overflows" else ()
    check_refused(outcomes[case], FINITE[case][2], new)


def test_an_overflowing_loss_is_reported_with_its_table(outcomes, work):
    out = outcomes["eval whose loss overflows"]
    assert "nan" in out["stdout"]  # the table is printed, then the error
    rows = json.loads((work / "overflow.json").read_text())  # strict JSON: the NaN loss is null
    assert rows[0]["loss"] is None and rows[0]["ppl"] is None


@pytest.mark.parametrize("case", FOREIGN)
def test_tampered_and_foreign_adapters_are_one_line(outcomes, case):
    check_refused(outcomes[case], FOREIGN[case][2])


@pytest.mark.slow
def test_the_fingerprint_covers_every_value_and_old_adapters_still_merge(work, tmp_path):
    from rwkv_peft.errors import RWKVPeftError
    from rwkv_peft.peft.adapter_file import base_fingerprint, check_base, read_adapter

    base = torch.load(work / "base.pth", weights_only=True)
    differs = torch.load(work / "differs.pth", weights_only=True)
    assert base_fingerprint(differs) != base_fingerprint(base)
    # fp32 and bf16 copies of the same weights agree, as training in another precision needs
    as_bf16 = {k: v.bfloat16() for k, v in base.items()}
    assert base_fingerprint(as_bf16) == base_fingerprint({k: v.float() for k, v in as_bf16.items()})
    # an adapter written with the sampled fingerprint is checked with it: its base passes, a base that
    # differs in a sampled value does not (one between the samples did not, and still does not)
    old = read_adapter(work / "old-format.safetensors")
    check_base(old, differs, "differs.pth")
    sampled = dict(base, **{"emb.weight": base["emb.weight"] + 0.5})
    with pytest.raises(RWKVPeftError, match="was trained on a different base"):
        check_base(old, sampled, "sampled.pth")
    merged = run(work, ["--adapter", "old-format.safetensors", "--output", tmp_path / "old.pth"], script="merge.py")
    assert merged.returncode == 0 and "verify: OK" in merged.stdout, merged.stderr[-2000:]
    other = run(work, ["--adapter", "old-format.safetensors", "--base", "base6.pth", "--output", tmp_path / "6.pth"],
                script="merge.py")
    one_error(other, "was trained on an RWKV-7 model, but base base6.pth is RWKV-6")


# ------------------------------------------------------------------------------------------------
# processes of their own: full disks, file-size limits, signals


@contextlib.contextmanager
def small_disk(path: Path, size: int, file_limit: int | None = None):
    """A directory on a file system of `size` bytes (a tmpfs, as root) -> (dir, preexec_fn, the error
    expected); elsewhere a plain directory and a preexec_fn for the command that limits every file
    it writes to file_limit (default: size) bytes."""
    file_limit = file_limit or size
    path.mkdir(parents=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        if mounted:
            yield path, None, "no space left on the disk of"
        else:
            yield path, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit)), \
                "grew past the largest file allowed here"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def run(work, args, preexec=None, timeout=600, script=None):
    cmd = [sys.executable, *([str(ROOT / script)] if script else []), *map(str, args)]
    return subprocess.run(cmd, cwd=work, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def one_error(proc, expected):
    # the error line proper: a progress bar may end without a line break before it
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def leftovers(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_text(path: Path, mb: float) -> None:
    line = json.dumps({"text": "the cat sat on a mat and saw one red bird fly over green hills " * 8}) + "\n"
    path.write_text(line * int(mb * 2**20 / len(line)))


@pytest.mark.slow
def test_prepare_on_a_full_disk_keeps_the_old_pair(work, tmp_path):
    with small_disk(tmp_path / "disk", 1 << 20) as (disk, preexec, full):
        first = run(work, ["-m", "rwkv_peft.data.prepare", "text.jsonl", disk / "pair", "--tokenizer", "tok.json"],
                    preexec)
        assert first.returncode == 0, first.stderr[-2000:]
        before = {p.name: digest(p) for p in disk.iterdir()}
        big_text(tmp_path / "big.jsonl", 4)
        proc = run(work, ["-m", "rwkv_peft.data.prepare", tmp_path / "big.jsonl", disk / "pair", "--tokenizer",
                          "tok.json", "--no_progress"], preexec)
        one_error(proc, full)
        assert "pair.bin" in proc.stderr and "the previous pair.bin is kept" in proc.stderr
        assert {p.name: digest(p) for p in disk.iterdir()} == before  # the previous complete pair, nothing else


@pytest.mark.slow
def test_merge_past_a_file_size_limit_keeps_the_old_output(work, tmp_path):
    out = tmp_path / "merged.pth"
    out.write_bytes(b"the previous merge")
    limit = (work / "base.pth").stat().st_size // 2
    proc = run(work, ["--adapter", "good.safetensors", "--output", out],
               lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)), script="merge.py")
    one_error(proc, f"--output {out} grew past the largest file allowed here")
    assert out.read_bytes() == b"the previous merge" and leftovers(tmp_path) == []


def test_merge_onto_a_disk_too_small_is_refused_before_merging(work, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs a small tmpfs (root)")
    with small_disk(tmp_path / "disk", 64 << 10) as (disk, preexec, _):
        if preexec is not None:
            pytest.skip("mounting a tmpfs is not permitted here")
        proc = run(work, ["--adapter", "good.safetensors", "--output", disk / "merged.pth"], script="merge.py")
        one_error(proc, f"--output {disk / 'merged.pth'} needs about")
        assert "merging" not in proc.stderr and list(disk.iterdir()) == []


SLOW_WRITES = """
import sys, time
import rwkv_peft.io as io
write = io._TrackedFileIO.write
def slow(self, b):  # a slow disk: every write takes 50 ms
    time.sleep(0.05)
    return write(self, b)
io._TrackedFileIO.write = slow
from rwkv_peft.commands import merge
sys.exit(merge(sys.argv[1:]))
"""


def merge_until_writing(work, out: Path):
    """A merge (on a slow disk) into out, returned once its temporary file exists."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITES, "--adapter", "good.safetensors", "--no_verify",
                             "--output", str(out)], cwd=work, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not leftovers(out.parent):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    assert leftovers(out.parent), "the merge never started writing"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_merge_write_removes_its_temporary_file(work, tmp_path, sig):
    out = tmp_path / "merged.pth"
    out.write_bytes(b"the previous merge")
    proc = merge_until_writing(work, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "stopped"
    assert out.read_bytes() == b"the previous merge" and leftovers(tmp_path) == []


@pytest.mark.slow
def test_the_temporary_file_of_a_killed_merge_is_removed_by_the_next(work, tmp_path):
    out = tmp_path / "merged.pth"
    proc = merge_until_writing(work, out)
    proc.kill()
    proc.communicate(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and str(proc.pid) in stale[0] and not out.exists()
    # a live writer's temporary file is left alone
    live = tmp_path / f".merged.pth.{stale[0].split('.')[-2].split('-')[0]}-{os.getpid()}-0123abcd.tmp"
    live.write_bytes(b"being written")
    done = run(work, ["--adapter", "good.safetensors", "--output", out], script="merge.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert leftovers(tmp_path) == [live.name] and out.stat().st_size > 0


@pytest.mark.slow
def test_stale_token_cache_temporaries_are_removed(work, tmp_path):
    from rwkv_peft.io import temp_path

    data = tmp_path / "data.jsonl"
    shutil.copy(work / "text.jsonl", data)
    cache = tmp_path / ".rwkv_peft_cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = temp_path(cache / "data.jsonl.0123456789abcdef.tokens").name
    stale = cache / name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-")
    stale.write_bytes(b"\0" * 100)
    proc = run(work, [*COMMON, "--data_file", data, "--dry_run"], script="train.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and leftovers(cache) == []


@pytest.mark.slow
def test_a_full_disk_while_tokenizing_for_training(work, tmp_path):
    with small_disk(tmp_path / "disk", 1 << 20, file_limit=200 << 10) as (disk, preexec, full):
        big_text(disk / "data.jsonl", 0.75)  # its tokens take about 350 KB: more than is left
        proc = run(work, [*COMMON, "--data_file", disk / "data.jsonl", "--max_steps", "1", "--proj_dir",
                          tmp_path / "run"], preexec, script="train.py")
        one_error(proc, full)
        assert "the token cache of" in proc.stderr and "move the data file to a disk with room" in proc.stderr
        assert not (tmp_path / "run").exists()
        assert sorted(p.name for p in disk.rglob("*")) == [".rwkv_peft_cache", "data.jsonl"]


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one(work, tmp_path):
    args = [*COMMON, "--peft", "full", "--max_steps", "4", "--save_every", "1"]
    probe = run(work, [*args, "--max_steps", "1", "--proj_dir", tmp_path / "probe"], script="train.py")
    assert probe.returncode == 0, probe.stderr[-2000:]
    one_save = sum(p.stat().st_size for p in (tmp_path / "probe").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", int(one_save * 1.6) // 4096 * 4096) as (disk, preexec, full):
        if preexec is not None:
            pytest.skip("needs a small tmpfs (root): a per-file limit cannot let one checkpoint fit and not two")
        proc = run(work, [*args, "--proj_dir", disk / "run"], script="train.py")
        one_error(proc, full)
        run_dir = disk / "run"
        assert (run_dir / "checkpoints/latest").read_text() == "step-00000001", proc.stderr[-2000:]
        assert (run_dir / "checkpoints/step-00000001/trainer.json").is_file()
        assert leftovers(disk) == [] and not list((run_dir / "checkpoints").glob(".step-*"))
        load_model(run_dir / "model.pth")  # complete, of step 1 or 2
