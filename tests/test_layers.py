"""The package's imports go down its layers only, and never in a circle.

Every import statement of rwkv_peft/ is read from the source, those inside functions too, and
checked against the layer order the README's Layout section draws.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rwkv_peft"

# Bottom-up; a module may import its own layer and the ones below it.
LAYERS = [
    ("foundation", ["errors", "io", "assets", "cli"]),
    ("data", ["data"]),
    ("model", ["model"]),
    ("peft", ["peft"]),
    ("loss and generation", ["loss", "preference", "grpo", "rollout", "generate"]),
    ("scoring", ["scoring"]),
    ("inference commands", ["eval", "chat", "run"]),
    ("export", ["export"]),
    ("training", ["train"]),
    ("commands", ["commands", ""]),  # "": the package's __init__, its public face
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                return level
    raise AssertionError(f"rwkv_peft.{module} belongs to no layer: add it to LAYERS and the README's Layout")


def imports_of(path: Path) -> set[str]:
    """The rwkv_peft modules path imports, as names relative to the package ('' for the package)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                target = "rwkv_peft" + ("." + target if target else "")
            else:
                target = node.module
            # `from pkg import mod` imports the module pkg.mod
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}".removeprefix("rwkv_peft.") in modules
                       else target for a in node.names]
        else:
            continue
        for t in targets:
            if t == "rwkv_peft" or t.startswith("rwkv_peft."):
                found.add(t.removeprefix("rwkv_peft").removeprefix("."))
    found.discard(here)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_imports_only_go_down():
    upward = [f"rwkv_peft.{m} ({LAYERS[layer_of(m)][0]}) imports rwkv_peft.{d or '__init__'} "
              f"({LAYERS[layer_of(d)][0]})"
              for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    deps = graph()
    cycles, done = [], set()

    def visit(m, path):
        if m in path:
            cycles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if m in done:
            return
        for d in sorted(deps.get(m, ())):
            if d:  # importing the package itself runs its __init__, which is the top layer
                visit(d, path + [m])
        done.add(m)

    for m in sorted(deps):
        visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a lazy import of the trainer from the model layer is caught."""
    fake = tmp_path / "rwkv_peft"
    (fake / "model").mkdir(parents=True)
    (fake / "train").mkdir()
    for p in ("__init__.py", "model/__init__.py", "train/__init__.py", "train/trainer.py"):
        (fake / p).write_text("")
    (fake / "model" / "rwkv.py").write_text("def f():\n    from ..train.trainer import train\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imports_of(fake / "model" / "rwkv.py") == {"train.trainer"}
    assert layer_of("model.rwkv") < layer_of("train.trainer")
