"""The WKV recurrences on CUDA: the kernels in ``cuda/``, built on first use, with autograd.

Same conventions as :mod:`rwkv_peft.model.wkv` (``[B, T, H, N]`` inputs, ``w`` is
log(-log(decay)), RWKV-7 state ``[N value, N key]``, RWKV-6 state ``[N key, N value]``)::

    y, new_state = wkv7_cuda(r, w, k, v, a, b, state=None)
    y, new_state = wkv6_cuda(r, w, k, v, u, state=None)

Both are differentiable with respect to every input, the initial state and (RWKV-6) ``u``
included, and carry the gradient of ``new_state`` back. Inside: fp32 state and
accumulation; ``w`` is read in fp32 and the other per-token vectors in bf16, fp16 or fp32
(float64 inputs compute in fp32); ``y`` comes back in the dtype of ``r`` and
``new_state`` in fp32. Any T >= 1 works, with no padding. The forward pass keeps the state
at the start of every 16-step chunk for the backward pass (``[B, H, ceil(T/16), N, N]``
fp32; RWKV-7 also keeps ``S a`` per step, ``[B, T, H, N]`` fp32), and only when a gradient
is needed. The backward replays each chunk from its checkpoint into a workspace of
``[B * H, 16, N, N]`` fp32 (see the comments at the top of ``cuda/wkv7.cu`` and
``cuda/wkv6.cu``), so it never divides by a decay.

The extension is compiled by ``torch.utils.cpp_extension.load`` (ninja, nvcc) the first
time it is needed, once per GPU architecture, head size and source hash, into
``~/.cache/rwkv_peft/wkv-sm<arch>-n<head size>-<hash>/`` (``$RWKV_PEFT_CACHE`` or
``$XDG_CACHE_HOME`` move it), so later runs load it in a second. A build prints one line
when it starts. Builds take ``build.lock`` in that folder, an flock that the OS drops when
its holder dies; under it, the lock file that torch's build waits on with no timeout can
only be one that a killed build left, and is removed. Set ``RWKV_PEFT_CUDA_VERBOSE=1`` to
see the build.

:func:`cuda_unavailable_reason` says, in one line, why the kernels cannot serve tensors on
a device (or None when they can); callers use it to fall back to the PyTorch forms. Before
it says None for a device, the kernel has passed a self-test there against the PyTorch
chunked path (rwkv_peft/model/wkv_self_test.py), run in a child process: a kernel that
builds but computes wrong results on some GPU, or crashes and takes its CUDA context down
with it, is caught at start-up and the calling process goes on. A pass is recorded beside
the build (per GPU model and version), so the child runs once per build and GPU model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from ..assets import CUDA_DIR
from .wkv import _check_shapes, _check_state, _check_u
from .wkv_self_test import self_test

__all__ = ["HEAD_SIZES", "CHUNK_LEN", "load_extension", "cuda_unavailable_reason", "wkv7_cuda", "wkv6_cuda"]

SOURCES = ("wkv_op.cpp", "wkv7.cu", "wkv6.cu")
# Head sizes with a build (one each, on demand). 64 is every official model's; at 128 the
# backward kernels keep their 2 x 128 per-thread rows partly in local memory: correct, slower.
HEAD_SIZES = (32, 64, 128)
CHUNK_LEN = 16  # steps between state checkpoints: wkv::CHUNK in cuda/wkv.h
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Dynamic shared memory of each kernel per block, in floats per unit of head size: the smem
# sizes of the launchers in cuda/wkv7.cu and cuda/wkv6.cu (tests/test_cuda_compile.py checks
# them against what the kernels ask for, through the host emulation).
SHARED_FLOATS = {7: {"forward": 6 * CHUNK_LEN, "backward": 9 * CHUNK_LEN + 2},
                 6: {"forward": 5 * CHUNK_LEN, "backward": 7 * CHUNK_LEN}}
# Longest a build may hold the build lock before a waiting process gives up (a build takes a
# minute or two; head size 128 on a busy machine several).
BUILD_TIMEOUT_S = 30 * 60
# Longest the self-test child may take: starting Python, torch and CUDA, then milliseconds.
SELF_TEST_TIMEOUT_S = 300
_RESULT_TAG = "WKV_SELF_TEST_RESULT "

_lock = threading.RLock()
_modules: dict[tuple, object] = {}
_reasons: dict[tuple, str | None] = {}


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("RWKV_PEFT_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rwkv_peft"


@functools.cache
def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@functools.cache
def _nvcc_info(nvcc: str) -> tuple[str | None, frozenset[int] | None]:
    """(release 'X.Y', compute capabilities it can compile for as ints like 90) of an nvcc."""
    release = archs = None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        release = m.group(1) if m else None
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            archs = frozenset(int(x) for x in re.findall(r"compute_(\d+)", out.stdout))
    except (OSError, subprocess.SubprocessError):
        pass
    return release, archs


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _arch_flag(cc: int, supported: frozenset[int] | None) -> str:
    """-gencode for compute capability cc: native code when nvcc knows the arch, else PTX of
    the newest arch below it that nvcc knows (the driver compiles it at load)."""
    if supported is None or cc in supported:
        return f"-gencode=arch=compute_{cc},code=sm_{cc}"
    older = [a for a in supported if a <= cc]
    if not older:
        raise RuntimeError(f"nvcc cannot compile for sm_{cc} or any older arch")
    return f"-gencode=arch=compute_{max(older)},code=compute_{max(older)}"


def _build_flags(cc: int, head_size: int, supported: frozenset[int] | None) -> tuple[list[str], list[str]]:
    cxx = ["-O3", f"-D_N_={head_size}"]
    cuda = ["-O3", "--use_fast_math", "-Xptxas", "-O3", _arch_flag(cc, supported), f"-D_N_={head_size}"]
    return cxx, cuda


def _source_hash(*extra: str) -> str:
    h = hashlib.sha256()
    for path in sorted(CUDA_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in (torch.__version__, str(torch.version.cuda), *extra):
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def _build_name(cc: int, head_size: int) -> tuple[str, Path, list[str], list[str]]:
    """(module name, build folder, C++ flags, nvcc flags) of the build for sm_cc."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    release, supported = _nvcc_info(nvcc)
    cxx, cuda = _build_flags(cc, head_size, supported)
    digest = _source_hash(*cxx, *cuda, str(release))[:16]
    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"rwkv_peft-{os.getuid()}"
    return f"rwkv_peft_wkv_sm{cc}_n{head_size}_{digest[:8]}", root / f"wkv-sm{cc}-n{head_size}-{digest}", cxx, cuda


@contextlib.contextmanager
def _build_lock(build_dir: Path, what: str):
    """Hold build_dir's build lock, waiting up to BUILD_TIMEOUT_S for another process's build.

    The lock is an flock on build.lock, which the OS releases when its holder exits or is
    killed. torch's cpp_extension.load guards the build with a plain lock file that it waits
    on for ever; every build here runs under this lock, so a torch lock file found while
    holding it was left by a build that was killed, and is removed."""
    import fcntl  # POSIX only, as the extension build is

    path = build_dir / "build.lock"
    with open(path, "a+") as f:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                waited = time.monotonic() - start
                if waited > BUILD_TIMEOUT_S:
                    raise RuntimeError(f"gave up after {waited:.0f} s waiting for process {holder} to build "
                                       f"{what} (lock {path}); stop that process and run again") from None
                if not told:
                    print(f"waiting for process {holder}, which is building {what} (lock {path})",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.5)
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            stale = build_dir / "lock"  # torch's (torch.utils.cpp_extension._jit_compile)
            if stale.exists():
                stale.unlink()
                print(f"removed {stale}, left by a build that was interrupted", file=sys.stderr, flush=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_extension(head_size: int = 64, device=None, verbose: bool | None = None):
    """The compiled kernel module for head_size on device's GPU architecture (built on first
    use, then cached on disk and in this process). Raises on any failure; see
    :func:`cuda_unavailable_reason` for a one-line diagnosis instead."""
    if head_size not in HEAD_SIZES:
        raise ValueError(f"no WKV CUDA kernel for head size {head_size} (available: {HEAD_SIZES})")
    device = _device(device)
    major, minor = torch.cuda.get_device_capability(device)
    cc = 10 * major + minor
    key = (cc, head_size)
    with _lock:
        if key in _modules:
            return _modules[key]
        from torch.utils import cpp_extension

        name, build_dir, cxx, cuda = _build_name(cc, head_size)
        build_dir.mkdir(parents=True, exist_ok=True)
        if verbose is None:
            verbose = os.environ.get("RWKV_PEFT_CUDA_VERBOSE", "") not in ("", "0")
        what = f"the WKV kernel for sm_{cc}, head size {head_size}"
        with _build_lock(build_dir, what):
            if not (build_dir / f"{name}.so").exists():
                print(f"building {what}: about a minute, once (into {build_dir})", file=sys.stderr, flush=True)
            module = cpp_extension.load(
                name=name,
                sources=[str(CUDA_DIR / s) for s in SOURCES],
                extra_cflags=cxx,
                extra_cuda_cflags=cuda,
                extra_include_paths=[str(CUDA_DIR)],
                build_directory=str(build_dir),
                with_cuda=True,
                verbose=verbose,
            )
        _modules[key] = module
        return module


def _first_error_line(exc: BaseException) -> str:
    text = " ".join(str(a) for a in exc.args) if exc.args else type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith("Error building extension"):
            return line[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def cuda_unavailable_reason(device=None, head_size: int = 64, version: int = 7) -> str | None:
    """None when the RWKV-``version`` CUDA kernel can serve tensors on device (default: the
    current CUDA device) with this head size; otherwise one line naming the cause and what to
    do. The first call per (device, head size, version) checks the card's shared memory,
    builds the extension (a minute or two, then seconds from the disk cache) and runs its
    self-test (rwkv_peft.model.wkv_self_test) in a child process, unless a pass is recorded
    beside the build; the answer is kept for the rest of the process."""
    if torch.version.cuda is None:
        build = "ROCm" if getattr(torch.version, "hip", None) else "CPU-only"
        return f"torch {torch.__version__} is a {build} build without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    device = _device(device)
    if device.type != "cuda":
        return f"tensors are on {device}, not on a CUDA device"
    key = (device.index, head_size, version)
    with _lock:
        if key not in _reasons:
            _reasons[key] = (_toolchain_reason(device, head_size)
                             or _shared_memory_reason(torch.cuda.get_device_properties(device), head_size, version)
                             or _check_kernel(device, head_size, version))
        return _reasons[key]


def shared_memory_bytes(version: int, head_size: int) -> dict[str, int]:
    """Dynamic shared memory per block of the version's kernels at head_size, by kernel name."""
    return {name: floats * head_size * 4 for name, floats in SHARED_FLOATS[version].items()}


def _shared_memory_reason(props, head_size: int, version: int) -> str | None:
    """Why the kernels cannot launch on a GPU with these properties (torch.cuda.get_device_properties)
    for lack of shared memory per block, or None. sm_75 (RTX 20xx, T4) allows 64 KiB: too
    little for the RWKV-7 backward at head size 128."""
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:
        return None
    over = {name: need for name, need in shared_memory_bytes(version, head_size).items() if need > limit}
    if not over:
        return None
    kernel = max(over, key=over.get)
    return (f"the RWKV-{version} {kernel} kernel at head size {head_size} needs {over[kernel]:,} B of shared memory "
            f"per block, more than the {limit:,} B that {props.name} (sm_{props.major}{props.minor}) allows")


def _toolchain_reason(device: torch.device, head_size: int) -> str | None:
    """Why the extension cannot be built for device, found without building it (or None)."""
    if head_size not in HEAD_SIZES:
        return f"head size {head_size} not compiled (WKV CUDA kernels exist for head sizes {HEAD_SIZES})"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    nvcc = _nvcc()
    if nvcc is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    release, supported = _nvcc_info(nvcc)
    if release and torch.version.cuda and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"nvcc is CUDA {release} but torch was built with CUDA {torch.version.cuda} (major versions must match)"
    if supported is not None and not any(a <= 10 * major + minor for a in supported):
        return f"unsupported arch: {name} is sm_{major}{minor}, nvcc {release} compiles for sm_{min(supported)} and up"
    return None


def _check_kernel(device: torch.device, head_size: int, version: int) -> str | None:
    """Build (or load) the extension for device, then self-test the version's kernel on it in
    a child process (see _self_test_in_child)."""
    try:
        ext = load_extension(head_size, device)
    except Exception as e:  # compiler or linker failure: report its first error line
        return (f"CUDA extension build failed: {_first_error_line(e)} "
                f"(RWKV_PEFT_CUDA_VERBOSE=1 shows the whole build)")
    return _self_test_in_child(ext, device, head_size, version)


def _where(device: torch.device) -> str:
    return f"{device}, {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)


def _self_test_in_child(ext, device: torch.device, head_size: int, version: int) -> str | None:
    """The self-test, run in a child process: an illegal memory access leaves the CUDA context
    unusable for the rest of the process that made it, so a kernel that crashes in this
    process would take the training down at its next CUDA call instead of falling back. A
    pass is recorded beside the build (per GPU model), so later runs skip the child; a
    failure is checked again next time (then the child costs a few seconds)."""
    model = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    passed = Path(ext.__file__).parent / f"self-test-passed-v{version}-{model.strip('-')}"
    if passed.exists():
        return None
    spec = {"device": device.index if device.type == "cuda" else None, "head_size": head_size, "version": version}
    what = f"RWKV-{version} kernel self-test on {_where(device)}"
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
    try:
        child = subprocess.run(_child_command(spec), capture_output=True, text=True, errors="replace", env=env,
                               timeout=SELF_TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{what} did not finish in {SELF_TEST_TIMEOUT_S} s (a hung kernel?)"
    results = [line for line in child.stdout.splitlines() if line.startswith(_RESULT_TAG)]
    if not results:  # the child died before reporting: a crash that would have taken this process down
        code = child.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = [line.strip() for line in child.stderr.splitlines() if line.strip()][-1:]
        return f"{what} crashed ({how}{': ' + last[0][:200] if last else ''})"
    reason = json.loads(results[-1][len(_RESULT_TAG):])["reason"]
    if reason is None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the child next time
            passed.touch()
    return reason


def _child_command(spec: dict) -> list[str]:
    return [sys.executable, "-c", "import json, sys; from rwkv_peft.model.wkv_cuda import _self_test_child; "
            "_self_test_child(json.loads(sys.argv[1]))", json.dumps(spec)]


def _self_test_child(spec: dict) -> None:
    """The child's side: load the (built) extension, self-test, print the result line."""
    head_size, version = spec["head_size"], spec["version"]
    device = torch.device("cpu") if spec["device"] is None else torch.device("cuda", spec["device"])
    try:
        reason = _run_self_test(load_extension(head_size, device), device, head_size, version)
    except Exception as e:
        reason = f"RWKV-{version} kernel self-test could not run on {device}: {_first_error_line(e)}"
    print(_RESULT_TAG + json.dumps({"reason": reason}), flush=True)


def _run_self_test(ext, device: torch.device, head_size: int, version: int) -> str | None:
    """The self-test of the version's kernel in ext, in this process."""
    kernel = functools.partial(_wkv7 if version == 7 else _wkv6, ext)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return self_test(kernel, version, head_size, device)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


def _kernel_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _KERNEL_DTYPES else torch.float32


def _check(r: Tensor, *others: Tensor) -> None:
    _check_shapes(r, *others)
    if r.device.type != "cuda":
        raise ValueError(f"the WKV CUDA kernels need CUDA tensors, got {r.device}")


def _state_in(state: Tensor | None, r: Tensor) -> Tensor | None:
    if state is None:
        return None
    B, _, H, N = r.shape
    _check_state(state, B, H, N)
    return state.to(device=r.device, dtype=torch.float32).contiguous()


def _stream(x: Tensor) -> int:
    """The current CUDA stream of x's device as an integer (what the bindings launch on)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, r, w, k, v, a, b, s0):
        y, sT, ckpt, sa = ext.wkv7_forward(r, w, k, v, a, b, s0, True, _stream(r))
        ctx.ext = ext
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dw, dk, dv, da, db, ds0 = ctx.ext.wkv7_backward(r, w, k, v, a, b, dy, ckpt, sa, dsT, _stream(r))
        return None, dr, dw, dk, dv, da, db, (ds0 if ctx.needs_input_grad[7] else None)


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, r, w, k, v, u, s0):
        y, sT, ckpt = ext.wkv6_forward(r, w, k, v, u, s0, True, _stream(r))
        ctx.ext = ext
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(r, w, k, v, u, ckpt)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, u, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dw, dk, dv, du, ds0 = ctx.ext.wkv6_backward(r, w, k, v, u, dy, ckpt, dsT, _stream(r))
        return None, dr, dw, dk, dv, du, (ds0 if ctx.needs_input_grad[6] else None)


def wkv7_cuda(r, w, k, v, a, b, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV on CUDA (maths and conventions of :func:`rwkv_peft.model.wkv.wkv7_sequential`).

    r, w, k, v, a, b: [B, T, H, N] CUDA tensors; state: None (zeros) or [B, H, N, N].
    Returns (y [B, T, H, N] in r's dtype, new_state [B, H, N, N] fp32).
    """
    _check(r, w, k, v, a, b)
    return _wkv7(load_extension(r.shape[-1], r.device), r, w, k, v, a, b, state)


def wkv6_cuda(r, w, k, v, u, state=None) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV on CUDA (maths and conventions of :func:`rwkv_peft.model.wkv.wkv6_sequential`).

    r, w, k, v: [B, T, H, N] CUDA tensors; u: [H, N]; state: None (zeros) or [B, H, N, N].
    Returns (y [B, T, H, N] in r's dtype, new_state [B, H, N, N] fp32).
    """
    _check(r, w, k, v)
    return _wkv6(load_extension(r.shape[-1], r.device), r, w, k, v, u, state)


# The two functions below hold everything but the choice of extension, so the tests can run
# them with the kernels built for the CPU (tests/test_cuda_compile.py, host emulation).


def _wkv7(ext, r, w, k, v, a, b, state):
    B, T, H, N = r.shape
    s0 = _state_in(state, r)
    if T == 0:
        return r.new_empty(r.shape), (s0 if s0 is not None else r.new_zeros(B, H, N, N, dtype=torch.float32))
    dt = _kernel_dtype(r)
    r_, k_, v_, a_, b_ = (x.to(dt).contiguous() for x in (r, k, v, a, b))
    w_ = w.to(torch.float32).contiguous()
    if _needs_grad(r, w, k, v, a, b, state):
        y, sT = _WKV7.apply(ext, r_, w_, k_, v_, a_, b_, s0)
    else:
        y, sT, _, _ = ext.wkv7_forward(r_, w_, k_, v_, a_, b_, s0, False, _stream(r_))
    return y.to(r.dtype), sT


def _wkv6(ext, r, w, k, v, u, state):
    B, T, H, N = r.shape
    _check_u(u, H, N)
    s0 = _state_in(state, r)
    if T == 0:
        return r.new_empty(r.shape), (s0 if s0 is not None else r.new_zeros(B, H, N, N, dtype=torch.float32))
    dt = _kernel_dtype(r)
    r_, k_, v_ = (x.to(dt).contiguous() for x in (r, k, v))
    w_ = w.to(torch.float32).contiguous()
    u_ = u.to(device=r.device, dtype=torch.float32).contiguous()
    if _needs_grad(r, w, k, v, u, state):
        y, sT = _WKV6.apply(ext, r_, w_, k_, v_, u_, s0)
    else:
        y, sT, _ = ext.wkv6_forward(r_, w_, k_, v_, u_, s0, False, _stream(r_))
    return y.to(r.dtype), sT
