"""rwkv_peft.io: atomic writes keep the old file on failure, leave no temporary behind, and
give the new file the mode a plain open() would."""

import os
import stat

import pytest
import torch

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.io import atomic_file, atomic_write, load_tensor_file, save_checkpoint_file, save_tensor_file_atomic


def test_atomic_write_replaces_or_keeps_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"first"  # the old content survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_write_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
        with open(tmp_path / "b", "wb") as f:  # what a plain open() gives
            f.write(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o640


def test_tensor_file_round_trip(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_tensor_file_atomic(sd, tmp_path / "m.pth")
    assert torch.equal(load_tensor_file(tmp_path / "m.pth")["w"], sd["w"])


def test_checkpoints_as_safetensors_round_trip_and_other_names_are_refused(tmp_path):
    sd = {"emb.weight": torch.randn(5, 3).bfloat16(), "ln_out.bias": torch.arange(3.0)}
    save_checkpoint_file(sd, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not a zip
    for name in ("m.safetensors", "m.pth"):
        if name == "m.pth":
            save_checkpoint_file(sd, tmp_path / name)
        back = load_tensor_file(tmp_path / name)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(RWKVPeftError, match=r"m.bin: unknown checkpoint format '.bin'; name it .pth"):
        save_checkpoint_file(sd, tmp_path / "m.bin", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.safetensors"]


def test_atomic_file_keeps_the_old_content_when_the_block_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"before")
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_file(target) as f:
            f.write(b"partly written")
            raise RuntimeError("stop")
    assert target.read_bytes() == b"before"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left

    with atomic_file(target) as f:
        f.write(b"after")
    assert target.read_bytes() == b"after"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
