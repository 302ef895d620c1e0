"""Validation during training, end to end through train.py: the held-out loss equals eval's and a
float64 reference (across two processes), validation leaves training bit for bit unchanged and
resumes exactly, --val_split holds records out, --early_stop, TensorBoard and W&B records."""

import glob
import json
import struct

import pytest
import torch

from rwkv_peft import load_model
from rwkv_peft.data.tokenizer import load_tokenizer
from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.eval import main as eval_main
from rwkv_peft.peft.adapter_file import read_adapter
from tiny_workspace import COMMON, losses, make_workspace, run_script

pytest.importorskip("deepspeed")

QA = [("red bird", "fly over green hills"), ("the cat", "sat on a mat"), ("one red", "bird fly over"),
      ("rain", "fell softly"), ("green hills", "while rain fell")]  # 5: the two processes' shards differ


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("validation"))
    with open(d / "val.jsonl", "w") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return d


def train(work, *args, nproc=1):
    return run_script(work, "train.py", *COMMON, "--peft", "lora", *args, nproc=nproc)


def records(run, key):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def float64_heldout_loss(work, adapter) -> float:
    """Mean CE per reply token of val.jsonl, from the chat format written out by hand, in float64."""
    tok = load_tokenizer(str(work / "tok.json"))
    model = load_model(work / "base.pth", adapter=adapter, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for q, a in QA:
        prompt, reply = tok.encode(f"User: {q}\n\nAssistant:"), tok.encode(f" {a}\n\n")
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
        for t in range(len(prompt), len(prompt) + len(reply)):  # token t is predicted at position t-1
            total -= logp[t - 1, ids[0, t]].item()
            count += 1
    return total / count


@pytest.mark.slow
def test_val_loss_equals_eval_and_a_float64_reference_across_two_processes(work, tmp_path):
    run = work / "two"
    proc = train(work, "--max_steps", "6", "--micro_bsz", "1", "--val_file", "val.jsonl", "--eval_every", "4",
                 "--eval_generate", "2", "--proj_dir", run.name, nproc=2)
    vals = records(run, "val_loss")
    assert [r["step"] for r in vals] == [4, 6]  # every 4 steps and at the end
    final = vals[-1]["val_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == final and summary["best_val_loss"] == min(r["val_loss"] for r in vals)
    assert all(0 <= r["val_task"] <= 1 for r in vals) and proc.stdout.count("'red bird' ->") == 2

    assert eval_main(["--adapter", str(run / "adapter.safetensors"), "--model", str(work / "base.pth"),
                      "--data", str(work / "val.jsonl"), "--tokenizer", str(work / "tok.json"), "--ctx_len", "32",
                      "--json", str(tmp_path / "eval.json")]) == 0
    by_eval = json.loads((tmp_path / "eval.json").read_text())[-1]
    assert by_eval["loss_tokens"] == vals[-1]["val_tokens"] == sum(len(a.split()) for _, a in QA)
    assert abs(final - by_eval["loss"]) < 1e-5
    assert abs(final - float64_heldout_loss(work, run / "adapter.safetensors")) < 1e-5
    assert (run / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_validation_changes_no_training_bit_and_resumes_to_the_same_best(work):
    args = ["--lora_dropout", "0.1", "--max_steps", "8", "--micro_bsz", "2", "--warmup_steps", "2"]
    val = ["--val_file", "val.jsonl", "--eval_every", "2", "--save_best"]
    train(work, *args, "--proj_dir", "plain")
    train(work, *args, *val, "--proj_dir", "val")
    assert losses(work / "val") == losses(work / "plain")
    a, b = read_adapter(work / "plain/adapter.safetensors"), read_adapter(work / "val/adapter.safetensors")
    for module in a.tensors:
        for name, t in a.tensors[module].items():
            assert torch.equal(b.tensors[module][name], t), (module, name)

    train(work, *args, *val, "--proj_dir", "halves", "--stop_at_step", "5")
    train(work, *args, *val, "--proj_dir", "halves", "--resume")
    assert records(work / "halves", "val_loss") == records(work / "val", "val_loss")
    assert losses(work / "halves") == losses(work / "val")
    best_file = "adapter-best.safetensors"
    assert (work / "halves" / best_file).read_bytes() == (work / "val" / best_file).read_bytes()
    straight, resumed = (json.loads((work / r / "summary.json").read_text()) for r in ("val", "halves"))
    best = min(records(work / "val", "val_loss"), key=lambda r: r["val_loss"])
    assert resumed["best_step"] == straight["best_step"] == best["step"]
    assert resumed["best_val_loss"] == straight["best_val_loss"] == best["val_loss"]


def wandb_history_keys(run_file) -> set[str]:
    """The keys logged to a W&B run, read from its .wandb transaction log (a LevelDB-style log
    of 32 KiB blocks, each record behind a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, keys = 7, b"", set()
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # block padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


@pytest.mark.slow
def test_val_split_early_stop_best_model_tensorboard_and_wandb(work, monkeypatch, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pattern = "the cat sat on a mat and saw one red bird".split()
    with open(work / "ids.jsonl", "w") as f:
        for i in range(16):
            words = pattern[i % 11:] + pattern[:i % 11]
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": " ".join(words[:3])},
                                                      {"role": "assistant", "content": " ".join(words[3:])}]}) + "\n")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(work),
                       "WANDB_CONFIG_DIR": str(work / "wandb-config"), "WANDB_CACHE_DIR": str(work / "wandb-cache"),
                       "WANDB_DATA_DIR": str(work / "wandb-data")}.items():
        monkeypatch.setenv(key, value)
    run = work / "split"
    run_script(work, "train.py", *COMMON, "--peft", "none", "--data_file", "ids.jsonl",
               "--max_steps", "12", "--micro_bsz", "2", "--val_split", "0.25", "--eval_every", "1", "--early_stop", "1",
               "--save_best", "--report_to", "tensorboard", "wandb", "--proj_dir", run.name)
    summary = json.loads((run / "summary.json").read_text())

    # held out: a quarter of the records, never in the part trained on
    heldout = [json.loads(line)["id"] for line in open(summary["val_data"])]
    trained_on = [json.loads(line)["id"] for line in open(summary["train_data"])]
    assert len(heldout) == 4 and not set(heldout) & set(trained_on)
    assert sorted(heldout + trained_on) == list(range(16))

    # early stop: at the first evaluation that is not below every earlier one
    vals = [r["val_loss"] for r in records(run, "val_loss")]
    stop = next((i for i in range(1, len(vals)) if vals[i] >= min(vals[:i])), len(vals) - 1)
    assert len(vals) == stop + 1 and summary["steps"] == stop + 1 < 12 and summary["early_stopped"]
    assert (run / "checkpoints" / (run / "checkpoints/latest").read_text() / "trainer.json").is_file()

    # the best full model is the one whose held-out loss was lowest: eval measures it again
    assert summary["best_checkpoint"] == str(run.name + "/model-best.pth") and summary["best_val_loss"] == min(vals)
    assert eval_main(["--model", str(run / "model-best.pth"), "--data", summary["val_data"], "--tokenizer",
                      str(work / "tok.json"), "--ctx_len", "32", "--json", str(tmp_path / "best.json")]) == 0
    assert abs(json.loads((tmp_path / "best.json").read_text())[0]["loss"] - min(vals)) < 1e-5

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "peak_memory_mb", "val_loss"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx(vals)
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses(run), abs=1e-6)

    (run_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert {"loss", "lr", "tokens_per_s", "peak_memory_mb", "val_loss"} <= wandb_history_keys(run_file)


def test_report_to_without_its_package_says_what_to_install(monkeypatch):
    import importlib.util

    from rwkv_peft.train.report import require_backends

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RWKVPeftError, match="--report_to wandb needs the wandb package: pip install wandb"):
        require_backends(["wandb"])
