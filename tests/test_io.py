"""rwkv_peft.io: atomic writes keep the old file on failure, leave no temporary behind, and
give the new file the mode a plain open() would."""

import os
import stat

import pytest
import torch

from rwkv_peft.errors import RWKVPeftError
from rwkv_peft.io import (atomic_file, atomic_write, check_not_inputs, first_non_finite, load_tensor_file,
                          remove_stale_temps, save_checkpoint_file, save_tensor_file_atomic, temp_path)


def test_atomic_write_replaces_or_keeps_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(RWKVPeftError, match="cannot write .*out.bin: disk full"):  # one line naming the file
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


def test_an_output_is_compared_with_the_inputs_by_inode(tmp_path):
    (tmp_path / "base.pth").write_bytes(b"x")
    os.symlink("base.pth", tmp_path / "link.pth")
    os.link(tmp_path / "base.pth", tmp_path / "hard.pth")
    os.symlink("missing.pth", tmp_path / "dangling.pth")
    inputs = {"--base": tmp_path / "base.pth", "--adapter": None, "--data": [tmp_path / "data.jsonl"]}
    for name in ("base.pth", "link.pth", "hard.pth", "./base.pth"):
        with pytest.raises(RWKVPeftError, match=f"--output .*{name} is the same file as --base"):
            check_not_inputs({"--output": f"{tmp_path}/{name}"}, inputs)
    check_not_inputs({"--output": tmp_path / "new.pth", "--other": tmp_path / "dangling.pth"}, inputs)
    with pytest.raises(RWKVPeftError, match="lies in .*run/checkpoints, which the run writes"):
        check_not_inputs({}, {"--load_model": tmp_path / "run/checkpoints/x.pth"},
                         {"the run": tmp_path / "run/checkpoints"})


def test_an_interruption_removes_the_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"before")
    for interruption in (KeyboardInterrupt, SystemExit):
        with pytest.raises(interruption):
            with atomic_file(target) as f:
                f.write(b"partly")
                raise interruption()
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and target.read_bytes() == b"before"


def test_a_directory_or_a_missing_directory_is_one_line(tmp_path):
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(RWKVPeftError, match="d.pth is a directory; name a file"):
        save_checkpoint_file({"w": torch.zeros(2)}, tmp_path / "d.pth", "--output")
    with pytest.raises(RWKVPeftError, match="directory .*nowhere does not exist; create it"):
        atomic_write(tmp_path / "nowhere/x.bin", lambda f: f.write(b"x"))


def test_stale_temporary_files_are_removed_only_when_their_owner_is_gone(tmp_path):
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    mine = temp_path(tmp_path / "m.pth")
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    other = tmp_path / ".m.pth.0123abcd.tmp"  # not our pattern (older versions): left alone
    for p in (mine, stale, other):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, "other.pth") == []
    assert remove_stale_temps(tmp_path, "m.pth") == [stale]
    atomic_write(tmp_path / "m.pth", lambda f: f.write(b"y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "m.pth"])


def test_non_finite_values_are_found_and_named(tmp_path):
    t = torch.zeros(3, 5)
    assert first_non_finite(t) is None
    assert first_non_finite(torch.full((10,), 3e38)) is None  # a sum that overflows is not a bad value
    t[2, 1] = float("-inf")
    assert first_non_finite(t) == (11, float("-inf"))
    assert first_non_finite(torch.tensor([1, 2])) is None  # integers hold no NaN
    torch.save({"a": torch.ones(2), "b": t.bfloat16()}, tmp_path / "m.pth")
    with pytest.raises(RWKVPeftError, match=r"checkpoint .*m.pth: tensor 'b' holds -inf at \[2, 1\] \(1 of its 15"):
        load_tensor_file(tmp_path / "m.pth")
    assert set(load_tensor_file(tmp_path / "m.pth", finite=False)) == {"a", "b"}
