"""Run many command lines of train.py / merge.py / demo/chat.py in ONE Python process, each
through the script's own main(argv), and report per case: the exit code, stderr, and the
files the case left behind. One interpreter start instead of one per case.

    python tests/script_cases.py CASES.json RESULTS.json     (run in the workspace directory)

CASES.json: [[name, script (e.g. "train" or "demo/chat"), [args...]], ...]. Used by
tests/test_reliability.py; each case's error path runs exactly as from the command line,
except for the interpreter start-up.
"""

import contextlib
import importlib
import importlib.util
import io
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def snapshot(d: Path) -> dict[str, tuple]:
    """Every path below d, except the data pipeline's token cache, with what tells a changed file:
    (inode, size, mtime) of the file itself (a symlink is not followed)."""
    found = {}
    for p in d.rglob("*"):
        if ".rwkv_peft_cache" in p.parts:
            continue
        st = p.lstat()
        found[str(p.relative_to(d))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def load_main(script: str):
    if script.startswith("rwkv_peft/"):  # a module of the package, run as python -m rwkv_peft.X
        return importlib.import_module(script.replace("/", ".")).main
    spec = importlib.util.spec_from_file_location(f"script_{script.replace('/', '_')}", ROOT / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_case(main, args: list[str]) -> tuple[object, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as e:  # argparse errors
            code = e.code
        except BaseException:  # noqa: BLE001 - an escaped exception is what the test looks for
            traceback.print_exc()
            code = "exception"
    return code, err.getvalue(), out.getvalue()


def main(cases_file: str, results_file: str) -> None:
    work = Path.cwd()
    mains, results = {}, {}
    for name, script, args in json.loads(Path(cases_file).read_text()):
        if script not in mains:
            mains[script] = load_main(script)
        before = snapshot(work)
        code, stderr, stdout = run_case(mains[script], args)
        after = snapshot(work)
        results[name] = {"code": code, "stderr": stderr, "stdout": stdout, "new": sorted(after.keys() - before.keys()),
                         "gone": sorted(before.keys() - after.keys()),
                         "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k]
                                           and not (work / k).is_dir()),
                         "pwned": (work / "PWNED").exists()}
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
