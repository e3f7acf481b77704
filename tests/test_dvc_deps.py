"""Every DVC stage's `deps` name exactly the project modules its command runs, so `dvc repro` is never stale.

A stage's command is `refine <sub-command> ...`. `stages/cli.py` (the `refine` console script) registers each
sub-command from one stage module; the stage's code is that module's import closure (imports inside functions
included), plus `stages/cli.py` itself and what it needs besides the command modules (`stages/common.py`).
The other command modules cli.py imports only to register them are left out: a change to `stages/train.py`
must not re-run `evaluate`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML  # a dependency of DVC itself

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")  # the project's own code, as pyproject.toml packages it
CLI = "stages/cli.py"  # the `refine` console script (pyproject.toml: refine = "stages.cli:main")
PROGRAM = "refine"


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def _substitute(value: Any, item: str) -> Any:
    if isinstance(value, str):
        return value.replace("${item}", item)
    if isinstance(value, list):
        return [_substitute(v, item) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, item): _substitute(v, item) for k, v in value.items()}
    return value


def _paths(entries: list[str | dict[str, Any]]) -> tuple[str, ...]:
    """`outs` / `metrics` / `plots` entries are a path or {path: options}."""
    return tuple(path for entry in entries for path in (entry if isinstance(entry, dict) else [entry]))


def load_stages() -> list[Stage]:
    """The stages of dvc.yaml; a foreach stage becomes one stage per item (`extract@train`), `${item}` filled in."""
    spec = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    stages = []
    for name, body in spec["stages"].items():
        expanded = [(name, body)]
        if "foreach" in body:
            items = body["foreach"]
            assert isinstance(items, list), f"dvc.yaml: stage {name}: only a list foreach is understood here"
            expanded = [(f"{name}@{item}", _substitute(body["do"], str(item))) for item in items]
        for stage_name, one in expanded:
            outs = _paths(one.get("outs", []) + one.get("metrics", []) + one.get("plots", []))
            stages.append(Stage(stage_name, " ".join(one["cmd"].split()), tuple(one.get("deps", [])), outs))
    return stages


def module_file(dotted: str) -> str | None:
    """The repository-relative file of a project module (`pipeline.splits` -> `pipeline/splits.py`, a package
    `pipeline.store` -> `pipeline/store/__init__.py`), else None."""
    if dotted.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT).as_posix()
    return None


def _with_parents(dotted: str) -> list[str]:
    """`pipeline.x` -> [`pipeline`, `pipeline.x`]: importing a module runs its packages' __init__ first."""
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`, a `python -m` shim; it never runs under the `refine` script."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def imported_modules(path: str) -> set[str]:
    """Project modules (files) that `path` imports anywhere in its body, imports inside functions included."""
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    package = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    if not path.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    shims = {id(inner) for node in ast.walk(tree) if _is_main_guard(node) for inner in ast.walk(node)}
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.extend(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: `from . import x`, `from .store import y`
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.extend(_with_parents(source))
            names.extend(f"{source}.{alias.name}" for alias in node.names)  # `from pipeline import distributed`
    return {file for name in names if (file := module_file(name)) is not None}


def _typer_name(call: ast.Call) -> str | None:
    """The name a Typer registration gives: its first positional string or `name=`."""
    name = next((a.value for a in call.args if isinstance(a, ast.Constant)), None)
    keyword = next((k.value for k in call.keywords if k.arg == "name"), None)
    return keyword.value if isinstance(keyword, ast.Constant) else name


def registered_commands() -> dict[str, str]:
    """Sub-command name -> dotted module that defines it, read from how stages/cli.py registers its commands."""
    tree = ast.parse((ROOT / CLI).read_text(), filename=CLI)
    origin = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            origin.update({alias.asname or alias.name: node.module for alias in node.names})
    here = CLI.removesuffix(".py").replace("/", ".")
    commands: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Name):
            continue
        function, inner = node.args[0].id, node.func
        # app.command("name")(function); without a name Typer uses the function's, with dashes
        if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "command":
            commands[_typer_name(inner) or function.replace("_", "-")] = origin.get(function, here)
        # app.add_typer(group, name="store"): the group's module defines its sub-commands
        elif isinstance(inner, ast.Attribute) and inner.attr == "add_typer":
            commands[_typer_name(node) or function] = origin.get(function, here)
    for node in tree.body:  # @app.command("name") on a function of cli.py itself
        for decorator in node.decorator_list if isinstance(node, ast.FunctionDef) else []:
            func = decorator.func if isinstance(decorator, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "command":
                commands[_typer_name(decorator) or node.name.replace("_", "-")] = here
    return commands


def closure(starts: Set[str], stop: Set[str] = frozenset()) -> dict[str, str | None]:
    """Every module reachable from `starts` (never entering `stop`) -> the module that first imported it."""
    importer: dict[str, str | None] = dict.fromkeys(sorted(starts))
    queue = sorted(starts)
    while queue:
        current = queue.pop(0)
        for module in sorted(imported_modules(current)):
            if module not in importer and module not in stop:
                importer[module] = current
                queue.append(module)
    return importer


def stage_code(stage: Stage) -> dict[str, str | None]:
    """The project modules a stage's command runs -> the module that imports each (None where it starts)."""
    words = stage.cmd.split()
    assert words[0] == PROGRAM, f"dvc.yaml: stage {stage.name}: the command does not start with `{PROGRAM}`"
    commands = registered_commands()
    assert words[1] in commands, f"dvc.yaml: stage {stage.name}: `{PROGRAM} {words[1]}` is not registered in {CLI}"
    entry = module_file(commands[words[1]])
    assert entry is not None, f"{CLI}: `{words[1]}` comes from {commands[words[1]]}, which is no project file"
    code = closure({entry})
    # cli.py runs for every command (its --debug callback, its Typer settings); its other commands do not.
    others = {file for module in commands.values() if (file := module_file(module)) not in (entry, CLI)}
    for module, importer in closure({CLI}, stop=others | set(code)).items():
        code.setdefault(module, importer)
    return code


def _chain(code: dict[str, str | None], module: str) -> str:
    """How the command reaches `module`: `pipeline/errors.py <- pipeline/extraction/extract.py <- stages/train.py`."""
    chain = [module]
    while (importer := code[chain[-1]]) is not None:
        chain.append(importer)
    return " <- ".join(chain) if len(chain) > 1 else f"{module} runs the command"


STAGES = load_stages()


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_deps_name_every_module_the_stage_command_imports(stage: Stage) -> None:
    code = stage_code(stage)
    missing = sorted(set(code) - set(stage.deps))
    assert not missing, (
        f"dvc.yaml: stage {stage.name}: {len(missing)} module(s) its command imports are missing from deps "
        "(a change to them would not re-run it):\n" + "\n".join(f"  {m}   ({_chain(code, m)})" for m in missing)
    )


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_deps_name_no_module_the_stage_command_never_imports(stage: Stage) -> None:
    # Such a dep re-runs the stage for nothing, e.g. a sibling command's module or one whose code moved away.
    code = stage_code(stage)
    extra = sorted(dep for dep in stage.deps if dep.split("/")[0] in PACKAGES and dep not in code)
    assert not extra, f"dvc.yaml: stage {stage.name}: deps name module(s) its command never imports: {extra}"


def test_every_dep_is_a_file_or_the_output_of_a_stage() -> None:
    outputs = [out.rstrip("/") for stage in STAGES for out in stage.outs]
    dangling = [
        f"  {stage.name}: {dep}"
        for stage in STAGES
        for dep in stage.deps
        if not (ROOT / dep).exists() and not any(dep == out or dep.startswith(out + "/") for out in outputs)
    ]
    assert not dangling, "dvc.yaml: deps that are neither a file nor a stage's output:\n" + "\n".join(dangling)


@pytest.mark.parametrize("entry", sorted({registered_commands()[s.cmd.split()[1]] for s in STAGES}))
def test_static_reading_finds_every_module_a_real_import_loads(entry: str) -> None:
    # Guards the parsing above against a form of import it does not understand: a fresh interpreter imports
    # the command's module; everything it loads must be in the static closure (which adds lazy imports).
    script = (
        f"import json, sys, {entry}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = {file for module in json.loads(run.stdout.splitlines()[-1]) if (file := module_file(module))}
    missed = sorted(loaded - set(closure({module_file(entry)})))
    assert not missed, f"importing {entry} loads {missed}, which reading its imports did not find"


def test_cli_registrations_are_read_as_typer_reads_them() -> None:
    # Guards the parsing of stages/cli.py the checks above rely on, against the live Typer app.
    from stages.cli import app

    live = {c.name or c.callback.__name__.replace("_", "-"): c.callback.__module__ for c in app.registered_commands}
    live.update({g.name: g.typer_instance.registered_commands[0].callback.__module__ for g in app.registered_groups})
    assert registered_commands() == live
    assert {"demo-data", "extract", "train", "evaluate"} <= set(live)
