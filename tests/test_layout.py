"""The layers: keystep/ (the config, imported by every layer) < storage/ < tasks/ < flows/ (the CLI on top), with no
import cycle — function-level imports included — and no test server inside the installed package."""
import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = {"keystep": 0, "storage": 1, "tasks": 2, "flows": 3}


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    graph = {}
    for package in LAYERS:
        for path in (ROOT / package).glob("*.py"):
            module = f"{package}.{path.stem}"
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                if isinstance(node, ast.ImportFrom) and node.module in LAYERS:   # from tasks import ingest
                    names = [f"{node.module}.{a.name}" for a in node.names]
                found |= {n for n in names if n.split(".")[0] in LAYERS and n != module}
            graph[module] = found
    return graph


def test_no_import_cycle_and_no_layer_imports_one_above_it():
    graph = project_imports()
    for module, imports in graph.items():
        for imported in imports:
            assert LAYERS[imported.split(".")[0]] <= LAYERS[module.split(".")[0]], f"{module} imports {imported}"
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph.get(module, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_keystep_package_holds_only_the_config():
    assert sorted(p.name for p in (ROOT / "keystep").glob("*.py")) == ["__init__.py", "config.py"]
    assert not list(Path(ROOT / "flows").glob("fake_*.py")) and (ROOT / "tests" / "fake_openai.py").exists()


def test_a_training_rank_and_the_stage_functions_import_without_prefect():
    """A torchrun rank runs the plain training loop: importing it (and so every stage module it reads) pulls in no
    Prefect — the stage modules' Prefect tasks are built on first use."""
    import subprocess
    import sys

    code = "import sys, tasks.train_worker, tasks.token_weights, tasks.evaluate; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_following_distills_config_climbs_back_up_at_most_5_times():
    """bench/config_walk.py's count (issue 22): a function handed a config section that takes the whole config too,
    or a call back into a module the walk already left."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_walk", ROOT / "bench" / "config_walk.py")
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    edges, reached = walk.climbs()
    assert reached > 50, "the walk no longer follows the config into the stages"
    assert len(edges) <= 5, edges


def test_one_place_reads_a_stage_cache_and_every_stage_is_declared_once():
    """Stage bodies start at their work: the catalog's cache is read only by tasks/stage.py's `Stage` (and its
    `cached_output`), and each stage is declared once, as a `Stage(...)` with a frozen inputs model."""
    import importlib

    readers = sorted(p.name for p in (ROOT / "tasks").glob("*.py")
                     if "cached_output(" in p.read_text() and p.name != "stage.py")
    assert readers == []
    from tasks.stage import Stage

    stages = {}
    for path in (ROOT / "tasks").glob("*.py"):
        module = importlib.import_module(f"tasks.{path.stem}")
        stages |= {s.name: s for s in vars(module).values() if isinstance(s, Stage)}
    assert sorted(stages) == ["curriculum", "difficulty", "evaluate", "export", "generate", "ingest", "steps",
                              "student", "student-warmup", "teacher-scores", "token-weights", "train"]
    assert all(s.inputs.model_config.get("frozen") and s.inputs.model_config.get("extra") == "forbid"
               for s in stages.values())
