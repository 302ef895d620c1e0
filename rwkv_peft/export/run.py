"""merge.py's entry point for every output format:

    pth, safetensors   the official checkpoint (peft/merge.py), as before
    hf                 a Hugging Face RWKV-7 directory (hf.py)
    gguf               a llama.cpp GGUF file (gguf.py)
    peft               the adapter unmerged, as a Hugging Face peft adapter directory (peft_dir.py)

With no adapter (--base and --format only) the base itself is converted. A merge is run against
base + adapter first (peft/merge.py); then every hf, gguf and peft output is read back and run
before it appears under its name, and a converted .pth/.safetensors right after it is written
(removed again if that fails). Nothing is left behind when a check fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.tokenizer import tokenizer_for
from ..errors import RWKVPeftError
from ..io import (check_checkpoint_suffix, check_not_inputs, check_output_file, load_tensor_file, remove_stale_temps,
                  save_checkpoint_file, temp_path, write_error)
from ..model.config import infer_config
from ..peft.merge import TOLERANCE, check_merge, merge_adapter, merge_files
from .files import check_new_dir, write_dir_atomic
from .gguf import GGUF_TYPES, read_gguf, write_gguf
from .hf import check_exportable, check_hf_dir, read_hf, write_hf
from .verify import check_logits

FORMATS = ("pth", "safetensors", "hf", "gguf", "peft")
NEXT = {  # what to run with each export (README: Deploy)
    "hf": "pip install rwkv7-hf; python -c \"from rwkv7_hf import RWKV7ForCausalLM; "
          "RWKV7ForCausalLM.from_pretrained('{output}')\"",
    "gguf": "llama-cli -m {output}   (Ollama: a Modelfile with the line FROM {output})",
}
# relative logit tolerance of a GGUF file read back, by --gguf_type (fp32 compute on its weights)
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2, "q8_0": 5e-2}


def resolve_format(fmt: str | None, output: str | None) -> str:
    """--format, else the --output name: .pth, .safetensors, .gguf, or a directory (hf)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise RWKVPeftError(f"--format {fmt}: unknown format; choose one of {', '.join(FORMATS)}")
        if fmt in ("pth", "safetensors") and output and Path(output).suffix != f".{fmt}":
            raise RWKVPeftError(f"--output {output} does not end in .{fmt}, which --format {fmt} writes; "
                                "rename the output or drop --format")
        if fmt == "gguf" and output and Path(output).suffix != ".gguf":
            raise RWKVPeftError(f"--output {output} does not end in .gguf; name the GGUF file FILE.gguf")
        return fmt
    if output is None:
        return "pth"
    suffix = Path(output).suffix
    if suffix in (".pth", ".safetensors", ".gguf"):
        return suffix[1:]
    if suffix == "" or output.endswith(os.sep) or Path(output).is_dir():
        return "hf"
    raise RWKVPeftError(f"--output {output}: unknown checkpoint format '{suffix}'; name it .pth, .safetensors or "
                        ".gguf, give a directory (Hugging Face), or pass --format")


def default_output(fmt: str, adapter_path: str | None, base: str) -> str:
    """Beside the adapter (merged.*), or beside the base for a conversion (<base name>.*)."""
    beside = Path(adapter_path) if adapter_path else Path(base)
    stem = "merged" if adapter_path else beside.stem
    name = {"pth": f"{stem}.pth", "safetensors": f"{stem}.safetensors", "gguf": f"{stem}.gguf",
            "hf": f"{stem}-hf", "peft": "peft-adapter"}[fmt]
    return str(beside.with_name(name))


def export_files(base: str | None, adapter_path: str | None, output: str | None, fmt: str | None = None, *,
                 tokenizer: str = "auto", gguf_type: str = "f32", verify: bool = True,
                 lora_alpha: float | None = None, pissa_init: str | None = None, log=print) -> str:
    """Merge adapter_path into base (or convert base alone) and write it as fmt; returns the output path."""
    from ..peft.adapter_file import check_base, read_adapter, recorded_base

    fmt = resolve_format(fmt, output)
    if gguf_type not in GGUF_TYPES:
        raise RWKVPeftError(f"--gguf_type {gguf_type}: unknown type; choose one of {', '.join(GGUF_TYPES)}")
    if gguf_type != "f32" and fmt != "gguf":
        raise RWKVPeftError(f"--gguf_type is for --format gguf; drop it for --format {fmt}")
    if adapter_path is None and base is None:
        raise RWKVPeftError("nothing to export: pass --adapter FILE, or --base FILE to convert a checkpoint")
    if fmt == "peft":
        if adapter_path is None:
            raise RWKVPeftError("--format peft writes an adapter; pass --adapter FILE")
        from .peft_dir import export_peft

        output = output or default_output(fmt, adapter_path, base or "")
        return export_peft(base, adapter_path, output, verify=verify, lora_alpha=lora_alpha,
                           pissa_init=pissa_init, log=log)
    if fmt in ("pth", "safetensors") and adapter_path is not None:
        return merge_files(base, adapter_path, output or default_output(fmt, adapter_path, ""), verify=verify,
                           lora_alpha=lora_alpha, pissa_init=pissa_init, log=log)

    adapter = None
    if adapter_path is not None:
        adapter = read_adapter(adapter_path, lora_alpha=lora_alpha, pissa_init=pissa_init)
        base = base or recorded_base(adapter, adapter_path, "pass --base FILE")
    output = output or default_output(fmt, adapter_path, base)
    check_not_inputs({"--output": output}, {"--base": base, "--adapter": adapter_path, "--pissa_init": pissa_init,
                                            "--tokenizer": None if tokenizer == "auto" else tokenizer})
    if fmt == "hf":
        check_new_dir(output)
    else:  # a file: not a directory, in a writable directory
        check_output_file(output, f"--output {output}")
    base_sd = load_tensor_file(base)
    tok = None
    if fmt in ("hf", "gguf"):  # before the merge: a model the format cannot hold fails at once
        check_exportable(infer_config(base_sd), fmt)
        tok = tokenizer_for(base_sd["emb.weight"].shape[0], tokenizer)
    if adapter is None:
        sd = base_sd
        log(f"base:    {base} (converted as it is, no adapter)")
    else:
        check_base(adapter, base_sd, base)
        log(f"base:    {base}\nadapter: {adapter_path} ({len(adapter.layers)} adapted layers, "
            f"{len(adapter.parts)} whole tensors)")
        sd = merge_adapter(base_sd, adapter, progress=True)
        if verify:
            log(check_merge(base_sd, adapter, sd, base_sd["emb.weight"].dtype))

    if fmt in ("pth", "safetensors"):
        check_checkpoint_suffix(output, "--output")
        save_checkpoint_file(sd, output, "--output")
        if verify:
            try:
                log(check_logits(sd, load_tensor_file(output), TOLERANCE.get(sd["emb.weight"].dtype, 5e-2), output))
            except RWKVPeftError:
                Path(output).unlink()
                raise
    else:
        check_exportable(infer_config(sd), fmt)  # again: the adapter may add what the format cannot hold
        if fmt == "hf":
            write_dir_atomic(output, lambda d: _write_hf_checked(sd, tok, d, verify, log))
        else:
            _write_gguf_checked(sd, tok, Path(output), gguf_type, verify, log)
    log(f"wrote {output}")
    if fmt in NEXT:
        log("next: " + NEXT[fmt].format(output=output))
    return output


def _write_hf_checked(sd, tok, directory: Path, verify: bool, log) -> None:
    write_hf(sd, tok, directory)
    check_hf_dir(directory, sd)
    if verify:
        log(check_logits(sd, read_hf(directory, sd), TOLERANCE.get(sd["emb.weight"].dtype, 5e-2),
                         "the Hugging Face directory"))


def _write_gguf_checked(sd, tok, output: Path, gguf_type: str, verify: bool, log) -> None:
    """Written beside output under a temporary name (io.temp_path), read back, then renamed."""
    remove_stale_temps(output.parent, output.name)
    tmp = temp_path(output)
    try:
        try:
            write_gguf(sd, tok, tmp, gguf_type)
        except OSError as e:
            raise write_error(output, e, f"--output {output}") from None
        if verify:
            log(check_logits(sd, read_gguf(tmp, sd), GGUF_TOLERANCE[gguf_type], f"the {gguf_type} GGUF file"))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
