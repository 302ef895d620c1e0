"""Slow checks of the CUDA kernels (cuda/) that need no GPU.

1. ThreadSanitizer over the host emulation (cuda/wkv_host_emulation.h: one std::thread per
   CUDA thread, blocks two at a time in a shuffled order): tests/cuda_checks/tsan_driver.cpp
   runs every kernel in fp32 and bf16 at head sizes 16, 32, 64 and 128, built with
   -fsanitize=thread; TSan must stay silent. The check can fail: with the barrier after
   the backward's `dsa` write removed from a copy of cuda/wkv7.cu, or the one after the
   backward's staging loop from a copy of cuda/wkv6.cu (both call sites of each, one per
   thread role), it reports a data race.
2. Resources per architecture (bench/ptxas_resources.py: nvcc -Xptxas -v for sm_75 ... sm_120
   at head sizes 32, 64 and 128): each kernel's shared memory fits the architecture's opt-in
   limit, except where wkv_cuda refuses the kernel before building it (RWKV-7 backward at
   head size 128 on sm_75), registers and spills are printed, and the RWKV-7 backward at head
   size 64 spills under 64 bytes on sm_80 to sm_89.

About 40 s (TSan) and 3 minutes (ptxas) of CPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from rwkv_peft.model import wkv_cuda

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ptxas_resources  # noqa: E402

CUDA_DIR = wkv_cuda.CUDA_DIR
CXX = shutil.which("g++")
DRIVER = Path(__file__).parent / "cuda_checks" / "tsan_driver.cpp"
TSAN_HEAD_SIZES = (16, 32, 64, 128)
TSAN_FLAGS = ["-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-Wno-unknown-pragmas",
              "-DWKV_HOST_EMULATION"]

pytestmark = pytest.mark.slow


def _run_all(commands: list[list[str]], jobs: int = 2) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: subprocess.run(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, timeout=900), commands))


def _tsan_programs(cuda_dir: Path, out: Path, head_sizes) -> dict[int, Path]:
    """The driver and the kernels of cuda_dir built with ThreadSanitizer, one program per head size."""
    compiles, links = [], {}
    for n in head_sizes:
        objects = []
        for src in (cuda_dir / "wkv7.cu", cuda_dir / "wkv6.cu", DRIVER):
            obj = out / f"{src.stem}_n{n}.o"
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            compiles.append([CXX, *TSAN_FLAGS, f"-I{cuda_dir}", f"-D_N_={n}", *lang, "-c", str(src), "-o", str(obj)])
            objects.append(str(obj))
        links[n] = [CXX, "-fsanitize=thread", "-pthread", *objects, "-o", str(out / f"tsan_n{n}")]
    for result in _run_all(compiles) + _run_all(list(links.values())):
        assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout[-3000:]}"
    return {n: out / f"tsan_n{n}" for n in head_sizes}


def _run_under_tsan(program: Path) -> subprocess.CompletedProcess:
    env = {"TSAN_OPTIONS": "exitcode=66"}  # TSan's exit status when it reported a race
    return subprocess.run([str(program)], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def tsan_supported(tmp_path_factory):
    if CXX is None or sys.platform != "linux":
        pytest.skip("ThreadSanitizer runs need g++ on Linux")
    probe = tmp_path_factory.mktemp("tsan_probe")
    (probe / "t.cpp").write_text("int main() { return 0; }\n")
    done = subprocess.run([CXX, "-fsanitize=thread", str(probe / "t.cpp"), "-o", str(probe / "t")],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"g++ cannot link with -fsanitize=thread (libtsan missing?): {done.stderr.strip()[-200:]}")
    run = subprocess.run([str(probe / "t")], capture_output=True, text=True)
    if run.returncode:  # e.g. a kernel with more ASLR bits than this TSan maps
        pytest.skip(f"ThreadSanitizer does not run here: {run.stderr.strip()[-200:]}")


def test_no_data_race_at_any_head_size(tsan_supported, tmp_path):
    for n, program in _tsan_programs(CUDA_DIR, tmp_path, TSAN_HEAD_SIZES).items():
        run = _run_under_tsan(program)
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, f"head size {n}:\n{run.stderr[-6000:]}"
        assert run.stdout.strip() == "ran every kernel in fp32 and bf16"


def _copy_without(tmp_path: Path, name: str, before: str, barrier: str, count: int) -> Path:
    """cuda/ copied to tmp_path with the `count` barriers that follow `before` in `name` removed."""
    copy = tmp_path / "cuda"
    shutil.copytree(CUDA_DIR, copy)
    source = (copy / name).read_text()
    assert source.count(before + barrier) == count, f"{name} changed: update this test"
    (copy / name).write_text(source.replace(before + barrier, before))
    return copy


@pytest.mark.parametrize("name,kernel,before,barrier,count", [
    # the backward's two thread roles each pass these block-wide barriers: both go
    ("wkv7.cu", "wkv7_backward_kernel", "\n", "                __syncthreads();  // dsa complete (the other buffer is "
     "free for the next step)\n", 2),
    ("wkv6.cu", "wkv6_backward_kernel", "\n", "            __syncthreads();  // the chunk's vectors are staged\n", 2),
], ids=["wkv7-after-dsa", "wkv6-after-staging"])
def test_a_missing_barrier_is_reported(tsan_supported, tmp_path, name, kernel, before, barrier, count):
    """The check can fail: a copy of the sources without one of these barriers is reported, in
    the kernel that lost it (issue 23: the dsa barrier's removal passed every emulated
    comparison of tests/test_cuda_compile.py)."""
    program = _tsan_programs(_copy_without(tmp_path, name, before, barrier, count), tmp_path, (16,))[16]
    run = _run_under_tsan(program)
    assert run.returncode == 66 and "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-3000:]
    assert f"{kernel}<" in run.stderr.split("WARNING: ThreadSanitizer: data race")[1].split("\n\n")[0]


# ----------------------------------------------------------------------------------------
# 2. Resources per architecture
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ptxas_rows(tmp_path_factory):
    nvcc = wkv_cuda._nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    archs, missing = ptxas_resources.supported_archs(nvcc)
    print(f"nvcc cannot compile for: {', '.join(f'sm_{a}' for a in missing) or 'none missing'}")
    assert archs, "nvcc compiles for none of the architectures"
    return ptxas_resources.resources(nvcc, tmp_path_factory.mktemp("ptxas"), archs=archs)


def test_every_kernel_fits_each_architectures_shared_memory(ptxas_rows):
    """Static plus dynamic shared memory within the opt-in limit per block, or the kernel is
    refused, in one line, before it is built (wkv_cuda._shared_memory_reason)."""
    assert len(ptxas_rows) == 4 * 3 * 3 * len({r["arch"] for r in ptxas_rows})  # kernels, dtypes, head sizes
    refused = set()
    for row in ptxas_rows:
        limit = ptxas_resources.OPTIN_LIMIT[row["arch"]]
        props = SimpleNamespace(name=f"an sm_{row['arch']} GPU", major=row["arch"] // 10, minor=row["arch"] % 10,
                                shared_memory_per_block_optin=limit)
        reason = wkv_cuda._shared_memory_reason(props, row["head_size"], int(row["kernel"][3]))
        if row["static_smem"] + row["dynamic_smem"] > limit:
            assert reason is not None and row["kernel"].split("_")[1] in reason, row
            refused.add((row["arch"], row["head_size"], row["kernel"]))
    assert refused <= {(75, 128, "wkv7_backward")}, refused


def test_registers_and_spills_are_recorded(ptxas_rows, capsys):
    """Every kernel got its figures (the table bench/README.md records comes from
    bench/ptxas_resources.py), printed for the log; the RWKV-7 backward at head size 64, every
    official model's, spills under 64 bytes per thread on sm_80 to sm_89 (A100 and the
    consumer cards; it spilled 296 before its work was split in two roles)."""
    for row in ptxas_rows:
        assert {"registers", "spill_stores", "spill_loads", "static_smem"} <= set(row), row
        assert 0 < row["registers"] <= 255
        if row["kernel"] == "wkv7_backward" and row["head_size"] == 64 and 80 <= row["arch"] <= 89:
            assert row["spill_stores"] < 64, row
    with capsys.disabled():
        print("\n" + ptxas_resources.markdown(ptxas_rows))
