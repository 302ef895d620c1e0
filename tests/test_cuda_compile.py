"""Checks of the CUDA WKV kernels (cuda/) that need no GPU.

1. nvcc: every cuda/*.cu compiles to an object for sm_80 and sm_90, as the extension build
   compiles it (skipped without nvcc), so syntax and template errors show in CI.
2. Host emulation: the same kernel sources, compiled by the host C++ compiler with
   -DWKV_HOST_EMULATION (cuda/wkv_host_emulation.h: one std::thread per CUDA thread, a
   std::barrier for __syncthreads, blocks two at a time in a shuffled order), behind the
   real torch bindings cuda/wkv_op.cpp built against the installed (CPU) torch with the
   same definition, which only lets them take CPU tensors: outputs, final states and
   every gradient against autograd through the float64 sequential reference of
   rwkv_peft.model.wkv, with the autograd wrappers of rwkv_peft.model.wkv_cuda on top.
   Outputs and workspaces that torch allocates start as NaN (deterministic mode fills
   uninitialized memory), so a read of a slot nobody wrote shows.

All compiles start at once in the background. The file costs about 110 s of CPU time
(nvcc a third of it, the bindings, two head sizes, a third), i.e. about 60 s on two idle
cores. tests/test_cuda_checks.py has the ThreadSanitizer runs and the per-architecture
resources (slow).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv_peft.model import wkv_cuda
from rwkv_peft.model.wkv import wkv6_sequential, wkv7_sequential

CUDA_DIR = Path(wkv_cuda.__file__).resolve().parents[2] / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC_ARCHS = (80, 90)
CXX = shutil.which("g++") or shutil.which("c++")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _extension_nvcc_flags() -> list[str]:
    """The flags torch.utils.cpp_extension.load gives nvcc for our sources (its common ones,
    then wkv_cuda's), for sm_80 and sm_90 at once."""
    from torch.utils import cpp_extension

    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    std = "-std=c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "-std=c++17"
    _, ours = wkv_cuda._build_flags(80, 64, None)
    ours = [f for f in ours if "arch=" not in f] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in NVCC_ARCHS]
    return [*common, "--compiler-options", "-fPIC", std, *ours, f"-I{CUDA_DIR}"]


class Builds:
    """Every compile this file needs, started at once in the background (2 cores: the
    nvcc, g++ syntax-check and emulation builds overlap); wait() collects one group."""

    def __init__(self, out: Path):
        self.out = out
        self.procs: dict[str, dict[str, subprocess.Popen]] = {}

    def start(self, group: str, commands: dict[str, list[str]]) -> None:
        self.procs[group] = {label: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True) for label, cmd in commands.items()}

    def wait(self, group: str) -> dict[str, subprocess.CompletedProcess]:
        done = {}
        for label, p in self.procs[group].items():
            out, _ = p.communicate(timeout=600)
            done[label] = subprocess.CompletedProcess(p.args, p.returncode, out, "")
        return done

    def kill(self) -> None:
        for group in self.procs.values():
            for p in group.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _assert_ok(results: dict[str, subprocess.CompletedProcess]) -> None:
    failed = {label: r for label, r in results.items() if r.returncode != 0}
    assert not failed, "\n\n".join(f"{label} failed:\n{r.stdout[-4000:]}" for label, r in failed.items())


EMU_HEAD_SIZES = (16, 64)  # 16 keeps the emulated runs fast; 64 is the size the models use
EMU_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-DWKV_HOST_EMULATION"]


def bindings_command(cxx: str, head_size: int, out: Path) -> list[str]:
    """Compile cuda/wkv_op.cpp against the installed torch for the host emulation."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(CUDA_DIR)]
    return [cxx, *EMU_FLAGS, "-O1", f"-D_N_={head_size}", f"-DTORCH_EXTENSION_NAME=wkv_emulated_n{head_size}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{p}" for p in includes), "-c", str(CUDA_DIR / "wkv_op.cpp"),
            "-o", str(out)]


def link_extension(cxx: str, objects: list[Path], head_size: int, out_dir: Path):
    """Link the emulated kernels and the bindings into a Python extension module and import it."""
    from torch.utils import cpp_extension

    path = out_dir / f"wkv_emulated_n{head_size}{sysconfig.get_config_var('EXT_SUFFIX')}"
    libs = cpp_extension.library_paths()
    link = subprocess.run([cxx, "-shared", "-pthread", *map(str, objects), *(f"-L{p}" for p in libs),
                           *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
                           "-o", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _assert_ok({"link": link})
    name = f"wkv_emulated_n{head_size}"
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.ExtensionFileLoader(
        name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    b = Builds(tmp_path_factory.mktemp("wkv_builds"))
    nvcc = _nvcc()
    if nvcc is not None:  # 1. each .cu to an object for sm_80 and sm_90, the extension's flags, head size 64
        b.start("nvcc", {cu.name: [nvcc, "-c", *_extension_nvcc_flags(), str(cu), "-o", str(b.out / f"{cu.stem}.o")]
                         for cu in CU_FILES})
    if CXX is not None:  # 2. the kernels for the host emulation, and the real bindings in front of them
        b.start("emulation", {
            **{f"{cu.stem}_n{n}": [CXX, *EMU_FLAGS, f"-I{CUDA_DIR}", f"-D_N_={n}", "-x", "c++", "-c", str(cu), "-o",
                                   str(b.out / f"{cu.stem}_n{n}.o")] for n in EMU_HEAD_SIZES for cu in CU_FILES},
            **{f"wkv_op_n{n}": bindings_command(CXX, n, b.out / f"wkv_op_n{n}.o") for n in EMU_HEAD_SIZES}})
    yield b
    b.kill()


def test_cuda_sources_present():
    assert {p.name for p in CU_FILES} >= {"wkv7.cu", "wkv6.cu"}
    for name in wkv_cuda.SOURCES:
        assert (CUDA_DIR / name).exists(), name


def test_python_chunk_length_is_the_kernels():
    """The wrapper sizes the checkpoint tensors with CHUNK_LEN; the kernels step by wkv::CHUNK."""
    header = (CUDA_DIR / "wkv.h").read_text()
    match = re.search(r"constexpr int CHUNK = (\d+);", header)
    assert match and int(match.group(1)) == wkv_cuda.CHUNK_LEN


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_nvcc_compiles_every_kernel(builds):
    """Each .cu to an object for sm_80 and sm_90, with the extension's flags (head size 64)."""
    _assert_ok(builds.wait("nvcc"))
    for cu in CU_FILES:
        assert (builds.out / f"{cu.stem}.o").stat().st_size > 0


@pytest.mark.slow
def test_bindings_build_without_warnings(emulated, builds):
    for n in EMU_HEAD_SIZES:
        result = builds.wait("emulation")[f"wkv_op_n{n}"]
        # no warnings in our own file (torch's headers may warn; that is not ours to fix)
        assert not re.search(r"wkv_op\.cpp:\d+:\d+: warning", result.stdout), result.stdout[-4000:]


# ----------------------------------------------------------------------------------------
# 3. Host emulation
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated(builds):
    """{head size: the real bindings (cuda/wkv_op.cpp) over the kernels built for the host}."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    if sys.platform != "linux":
        pytest.skip("the host emulation build is set up for Linux")
    results = builds.wait("emulation")
    if any("<barrier>" in r.stdout and r.returncode for r in results.values()):
        pytest.skip("the host C++ compiler lacks C++20 <barrier>")
    _assert_ok(results)
    return {n: link_extension(CXX, [builds.out / f"{name}_n{n}.o" for name in ("wkv7", "wkv6", "wkv_op")], n,
                              builds.out) for n in EMU_HEAD_SIZES}


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """torch.empty fills with NaN in deterministic mode: outputs and workspaces the bindings
    allocate show any slot the kernels leave unwritten."""
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


def _inputs7(B, T, H, N, seed):
    """Model-like RWKV-7 inputs: w = -softplus(-x) - 0.5, a = -kk, b = kk * rate."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g) * 0.5
    w = -F.softplus(-(torch.randn(B, T, H, N, generator=g) * 2 - 1)) - 0.5
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    b = kk * torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    s0 = torch.randn(B, H, N, N, generator=g) * 0.3
    return [r, w, k, v, -kk, b], s0, g


def _inputs6(B, T, H, N, seed):
    """RWKV-6 inputs with decays from ~1 down to exp(-e) ~ 0.07 per step."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g) * 0.5
    w = torch.rand(B, T, H, N, generator=g) * 7 - 6
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g)
    u = torch.randn(H, N, generator=g) * 0.5
    s0 = torch.randn(B, H, N, N, generator=g) * 0.3
    return [r, w, k, v, u], s0, g


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(fn, ref_fn, ins, s0, g, dtype, bf16_like_inputs):
    """Run fn (the kernels through the autograd wrapper) and the float64 reference on the
    same (dtype-rounded) inputs with the same upstream gradients; relative errors."""
    ins = [x.to(dtype) if i in bf16_like_inputs else x for i, x in enumerate(ins)]
    B, T, H, N = ins[0].shape
    gy = torch.randn(B, T, H, N, generator=g).to(dtype)
    gs = torch.randn(B, H, N, N, generator=g)
    leaves = [x.clone().requires_grad_() for x in ins] + ([s0.clone().requires_grad_()] if s0 is not None else [])
    y, sT = fn(*leaves[:len(ins)], leaves[len(ins)] if s0 is not None else None)
    assert y.dtype == dtype and sT.dtype == torch.float32
    ((y.float() * gy.float()).sum() + (sT * gs).sum()).backward()
    refs = [x.detach().double().requires_grad_() for x in leaves]
    y_ref, s_ref = ref_fn(*refs[:len(ins)], refs[len(ins)] if s0 is not None else None)
    ((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum()).backward()
    errs = {"y": _rel(y, y_ref), "state": _rel(sT, s_ref)}
    for i, (x, xr) in enumerate(zip(leaves, refs)):
        assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape
        errs[f"grad{i}"] = _rel(x.grad, xr.grad)
    return errs


# (B, T, H): T = 1, below one chunk, one chunk exactly, several chunks with a partial last one
SHAPES = [(1, 1, 1), (2, 5, 2), (1, 16, 1), (2, 37, 2)]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dH%d" % s)
def test_emulated_wkv7_matches_float64_reference(emulated, shape, with_state, dtype):
    ext = emulated[16]
    ins, s0, g = _inputs7(*shape, 16, seed=sum(shape))
    errs = _compare(lambda *x: wkv_cuda._wkv7(ext, *x), wkv7_sequential, ins, s0 if with_state else None, g,
                    dtype, bf16_like_inputs={0, 2, 3, 4, 5})
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dH%d" % s)
def test_emulated_wkv6_matches_float64_reference(emulated, shape, with_state, dtype):
    ext = emulated[16]
    ins, s0, g = _inputs6(*shape, 16, seed=sum(shape))
    errs = _compare(lambda *x: wkv_cuda._wkv6(ext, *x), wkv6_sequential, ins, s0 if with_state else None, g,
                    dtype, bf16_like_inputs={0, 2, 3})
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_emulated_head_size_64(emulated, version):
    ext = emulated[64]
    if version == 7:
        ins, s0, g = _inputs7(1, 20, 1, 64, seed=3)
        fn, ref, low = (lambda *x: wkv_cuda._wkv7(ext, *x)), wkv7_sequential, {0, 2, 3, 4, 5}
    else:
        ins, s0, g = _inputs6(1, 20, 1, 64, seed=3)
        fn, ref, low = (lambda *x: wkv_cuda._wkv6(ext, *x)), wkv6_sequential, {0, 2, 3}
    for dtype in (torch.float32, torch.bfloat16):
        errs = _compare(fn, ref, ins, s0, g, dtype, low)
        assert max(errs.values()) < TOL[dtype], (dtype, errs)


@pytest.mark.slow
def test_emulated_rwkv6_fast_decays(emulated):
    """RWKV-6 decays down to ~1e-9 per step (w up to 3): no division by the decay anywhere."""
    ext = emulated[16]
    ins, s0, g = _inputs6(2, 40, 1, 16, seed=5)
    ins[1] = torch.rand(ins[1].shape, generator=g) * 9 - 6
    errs = _compare(lambda *x: wkv_cuda._wkv6(ext, *x), wkv6_sequential, ins, s0, g, torch.float32, {0, 2, 3})
    assert max(errs.values()) < 2e-6, errs


@pytest.mark.slow
def test_emulated_wrapper_paths(emulated):
    """No-grad path = grad path; mixed dtypes (w fp32, the rest bf16, as in the model);
    non-contiguous inputs; float64 computes in fp32; T = 0; the RNN split gives the whole."""
    ext = emulated[16]
    ins, s0, _ = _inputs7(2, 21, 2, 16, seed=7)
    r, w, k, v, a, b = ins
    with torch.no_grad():
        y0, s_0 = wkv_cuda._wkv7(ext, r, w, k, v, a, b, s0)
    leaves = [x.clone().requires_grad_() for x in ins]
    y1, s_1 = wkv_cuda._wkv7(ext, *leaves, s0)
    assert torch.equal(y0, y1.detach()) and torch.equal(s_0, s_1.detach())

    # mixed dtypes and a transposed (non-contiguous) r
    rt = r.transpose(1, 2).contiguous().transpose(1, 2)
    assert not rt.is_contiguous()
    lows = [x.to(torch.bfloat16) for x in (rt, k, v, a, b)]
    y2, _ = wkv_cuda._wkv7(ext, lows[0], w, *lows[1:], s0)
    y_ref, _ = wkv7_sequential(*(x.double() for x in (lows[0], w, *lows[1:])), s0.double())
    assert y2.dtype == torch.bfloat16 and _rel(y2, y_ref) < 1e-2

    # float64 in, float64 y out (computed in fp32)
    y3, s3 = wkv_cuda._wkv7(ext, *(x.double() for x in ins), s0.double())
    assert y3.dtype == torch.float64 and s3.dtype == torch.float32
    assert _rel(y3, wkv7_sequential(*(x.double() for x in ins), s0.double())[0]) < 2e-6

    # RNN mode: two calls with the carried state = one call
    ya, sa_ = wkv_cuda._wkv7(ext, *(x[:, :9] for x in ins), s0)
    yb, sb = wkv_cuda._wkv7(ext, *(x[:, 9:] for x in ins), sa_)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb, s_0, rtol=1e-5, atol=1e-5)

    # T = 0
    y4, s4 = wkv_cuda._wkv7(ext, *(x[:, :0] for x in ins), s0)
    assert y4.shape == (2, 0, 2, 16) and torch.equal(s4, s0)

    # RWKV-6: bf16 u with the others fp32; only y used (dsT None); grads reach u and the state
    r6, w6, k6, v6, u6 = (x.clone() for x in _inputs6(2, 18, 2, 16, seed=9)[0])
    u6 = u6.to(torch.bfloat16).requires_grad_()
    state = torch.zeros(2, 2, 16, 16).requires_grad_()
    y6, _ = wkv_cuda._wkv6(ext, r6, w6, k6, v6, u6, state)
    y6.sum().backward()
    assert u6.grad.dtype == torch.bfloat16 and u6.grad.abs().sum() > 0 and state.grad.abs().sum() > 0


@pytest.mark.slow
def test_emulated_checkpoint_memory_only_with_grad(emulated, monkeypatch):
    """The forward keeps checkpoints only when a gradient is needed."""
    ext = emulated[16]
    calls = []
    forward = ext.wkv7_forward

    def spy(*args):
        calls.append(args[7])  # save_for_backward
        return forward(*args)

    monkeypatch.setattr(ext, "wkv7_forward", spy)
    ins, s0, _ = _inputs7(1, 4, 1, 16, seed=1)
    wkv_cuda._wkv7(ext, *ins, s0)
    wkv_cuda._wkv7(ext, *ins, s0.requires_grad_())
    assert calls == [False, True]


class _FaultyExtension:
    """The emulated kernels with one planted fault: output `index` of binding `name` off by 1%."""

    def __init__(self, ext, name, index):
        self.ext, self.name, self.index = ext, name, index

    def __getattr__(self, name):
        binding = getattr(self.ext, name)
        if name != self.name:
            return binding

        def faulty(*args):
            outs = binding(*args)
            outs[self.index] = outs[self.index] * 1.01
            return outs

        return faulty


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_self_test_passes_the_emulated_kernels(emulated, monkeypatch, version):
    """The start-up self-test, through the same path as on a GPU (load_extension, then the
    autograd wrappers), accepts the real kernel code (head size 16: emulating 64 threads per
    block takes half a minute)."""
    assert wkv_cuda._run_self_test(emulated[16], torch.device("cpu"), 16, version) is None


@pytest.mark.slow
@pytest.mark.parametrize("version,binding,index,expected", [
    (7, "wkv7_backward", 1, "dw"),
    (7, "wkv7_backward", 6, "ds0"),
    (6, "wkv6_forward", 1, "final state (no grad)"),
])
def test_self_test_catches_a_faulty_extension(emulated, monkeypatch, version, binding, index, expected):
    faulty = _FaultyExtension(emulated[16], binding, index)
    reason = wkv_cuda._run_self_test(faulty, torch.device("cpu"), 16, version)
    assert reason is not None and "\n" not in reason
    assert reason.startswith(f"RWKV-{version} kernel self-test failed on cpu (float32, head size 16): "), reason
    assert expected in reason.split(" chunked path in ")[1].split(" (worst")[0].split(", "), reason


def test_cuda_unavailable_reason_is_one_line():
    reason = wkv_cuda.cuda_unavailable_reason()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_wkv_cuda.py covers it")
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert wkv_cuda.cuda_unavailable_reason("cpu") is not None


@pytest.mark.slow
def test_bindings_check_their_arguments(emulated):
    """The real checks of cuda/wkv_op.cpp, which the emulation runs in front of the kernels."""
    ext = emulated[16]
    ins, s0, _ = _inputs7(1, 4, 1, 16, seed=2)
    r, w, k, v, a, b = ins
    with pytest.raises(RuntimeError, match="head size 64 but this build is compiled for 16"):
        ext.wkv7_forward(*(torch.zeros(1, 4, 1, 64) for _ in range(6)))
    with pytest.raises(RuntimeError, match="w must be float32"):
        ext.wkv7_forward(r, w.double(), k, v, a, b)
    with pytest.raises(RuntimeError, match=r"k has dtype BFloat16, expected Float \(the dtype of r\)"):
        ext.wkv7_forward(r, w, k.bfloat16(), v, a, b)
    with pytest.raises(RuntimeError, match=r"state has shape \[1, 1, 16\], expected \[1, 1, 16, 16\]"):
        ext.wkv7_forward(r, w, k, v, a, b, s0[..., 0].contiguous())
    with pytest.raises(RuntimeError, match="ckpt has the wrong shape"):
        ext.wkv7_backward(r, w, k, v, a, b, r, torch.zeros(1), torch.zeros(1, 4, 1, 16))
    u = torch.zeros(2, 16)
    with pytest.raises(RuntimeError, match=r"u has shape \[2, 16\], expected \[H, N\] = \[1, 16\]"):
        ext.wkv6_forward(r, w, k, v, u)


@pytest.mark.slow
@pytest.mark.parametrize("version", [7, 6])
def test_launch_refuses_shared_memory_beyond_the_opt_in_limit(emulated, monkeypatch, version):
    """The launch helper's check (cuda/wkv_common.cuh) with the emulated device's limit set just
    below and at each kernel's need: also checks that the kernels ask for exactly the bytes that
    wkv_cuda.shared_memory_bytes (what the Python side checks before building) says."""
    ext = emulated[16]
    need = wkv_cuda.shared_memory_bytes(version, 16)
    ins, s0, _ = (_inputs7 if version == 7 else _inputs6)(1, 4, 1, 16, seed=4)
    forward = ext.wkv7_forward if version == 7 else ext.wkv6_forward
    backward = ext.wkv7_backward if version == 7 else ext.wkv6_backward

    def run_backward():
        saved = forward(*ins, s0, True)
        if version == 7:
            return backward(*ins, ins[0], saved[2], saved[3])
        return backward(*ins, ins[0], saved[2])

    for kernel, run in (("forward", lambda: forward(*ins, s0)), ("backward", run_backward)):
        others = max(n for name, n in need.items() if name != kernel)
        if others >= need[kernel]:  # the other kernel would be refused first
            continue
        monkeypatch.setenv("WKV_EMULATED_SHARED_MEMORY_OPTIN", str(need[kernel] - 1))
        with pytest.raises(RuntimeError) as e:
            run()
        assert str(e.value).splitlines()[0].endswith(
            f"kernel failed: head size 16 needs {need[kernel]} B of shared memory per block, more than the "
            f"{need[kernel] - 1} B that the emulated device allows (use --op torch)")
        monkeypatch.setenv("WKV_EMULATED_SHARED_MEMORY_OPTIN", str(need[kernel]))
        run()
