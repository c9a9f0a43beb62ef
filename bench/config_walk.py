"""How often following `distill`'s `config` through the code climbs back up (issue 22).

The walk: a static call graph (Python's `ast`) of the project's functions — flows/, tasks/, storage/, keystep/ —
followed depth-first from `flows.distill.distill` along every call that passes the run's config on (an argument
named `config`, or any expression reading it: `config.train`, `config.teacher`, ...). A *climb back up* is either
  - a function on the walk that is given a section of the config (`cfg: TrainConfig`, ...) and the whole config
    as well: handed its part, it climbs back to the root for the rest (c3bcab8's `setup(cfg, config)`), or
  - a call on the walk into a module the path has already left (A -> B -> A: a helper calling back into the stage
    module, a task reaching back into the flow that called it).
Each counts once. At c3bcab8 the walk reached 89 functions with 3 climbs (all of the first kind: build_model,
run_training, setup); now 0.

    python bench/config_walk.py          # prints the count and every climb-back edge, then the JSON line
    python bench/config_walk.py --smoke  # the same (it takes a second)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("keystep", "storage", "tasks", "flows")


def functions() -> dict[str, tuple[str, ast.FunctionDef, dict[str, str]]]:
    """qualified name -> (module, node, the module's imported names -> their qualified names). A stage declared as
    `NAME = Stage(name, Inputs, Output, lineage, body, ...)` (tasks/stage.py) is a function of its own, `NAME`, that
    calls its lineage, its body and the function its `@NAME.in_prefect` decorates."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            tree = ast.parse(path.read_text())
            imported = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    for alias in node.names:
                        imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.setdefault(f"{module}.{node.name}", (module, node, imported))
            for node in tree.body:
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                        and isinstance(node.value.func, ast.Name) and node.value.func.id == "Stage"):
                    name = node.targets[0].id
                    around = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                              and any(ast.unparse(d) == f"{name}.in_prefect" for d in f.decorator_list)]
                    calls = ", ".join(["config", *(ast.unparse(a) for a in node.value.args[3:5]), *around])
                    stage = ast.parse(f"def {name}(config):\n    run({calls})").body[0]
                    out[f"{module}.{name}"] = (module, stage, imported)
    return out


def passes_config(call: ast.Call) -> bool:
    """Whether a call hands the run's config (or a part of it) on."""
    args = [*call.args, *(k.value for k in call.keywords)]
    return any(isinstance(n, ast.Name) and n.id == "config" for a in args for n in ast.walk(a))


def callees(module: str, node: ast.FunctionDef, imported: dict[str, str], known: dict) -> list[str]:
    """The project functions a function hands the config to: the callee of a call passing it, and functions passed
    as arguments of such a call (`run(ingest_task, config, ...)`, a stage through its runner) or of `phase(...)`
    (`run.phase(train, ...)` calls the flow with the run's config)."""
    found = []
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        via_phase = isinstance(call.func, ast.Attribute) and call.func.attr == "phase"
        if not (passes_config(call) or via_phase):
            continue
        for target in [call.func, *call.args]:
            name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else None
            if name is None:
                continue
            for qualified in (imported.get(name), f"{module}.{name}"):
                if qualified in known and qualified not in found:
                    found.append(qualified)
                    break
    return found


def takes_section_and_config(node: ast.FunctionDef) -> bool:
    params = {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in [*node.args.args, *node.args.kwonlyargs]}
    whole = any(ann.endswith("DistillConfig") for ann in params.values())
    section = any(ann.endswith("Config") and not ann.endswith("DistillConfig") and ann != "ExperimentConfig"
                  for ann in params.values())
    return whole and section


def climbs(start: str = "flows.distill.distill") -> tuple[list[tuple[str, str]], int]:
    known = functions()
    edges: set[tuple[str, str]] = set()
    seen: set[str] = set()

    def walk(fn: str, modules: list[str]) -> None:
        seen.add(fn)
        module, node, imported = known[fn]
        if takes_section_and_config(node):
            edges.add((fn, "(a section and the whole config)"))
        for callee in callees(module, node, imported, known):
            callee_module = known[callee][0]
            if callee_module != module and callee_module in modules[:-1]:
                edges.add((fn, callee))
            if callee not in seen:
                walk(callee, [*modules, callee_module] if callee_module != module else modules)

    walk(start, [known[start][0]])
    return sorted(edges), len(seen)


if __name__ == "__main__":
    import json

    args = [a for a in sys.argv[1:] if a != "--smoke"]
    start = args[0] if args else "flows.distill.distill"
    edges, reached = climbs(start)
    print(f"{start}: {reached} functions reached along the config; {len(edges)} climb back up")
    for caller, callee in edges:
        print(f"  {caller} -> {callee}")
    print(json.dumps({"bench": "config_walk", "metric": f"climbs back up along {start}'s config", "value": len(edges),
                      "baseline": 3, "ratio": round(len(edges) / 3, 3), "goal": "0 climbs (baseline: 3 at c3bcab8)",
                      "met": not edges, "details": {"functions_reached": reached,
                                                    "edges": [f"{a} -> {b}" for a, b in edges]}}))
