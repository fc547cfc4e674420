"""The project's modules import each other as a tree: no circle, no arrow running up the layers
below, no import of a project module inside a function or class, none after the code starts.

The graph is read from the source with `ast` (nothing is imported), over every non-test module:
the top-level .py files and bench/. A new module must be given a layer here."""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from helpers import REPO

# Lowest first; a module may import only modules of lower layers. The layering
# sparo_head <- vision_transformer <- utils <- {datasets, augmentations} <- {features, knn,
# warm_start, timm_models, run folder, tensorboard_log, knn_monitor, ...} <- scripts, with the sets
# split where one member builds on another, and errors (UserError) under everything.
LAYERS: List[List[str]] = [
    ["errors"],
    ["sparo_head", "config_files", "devices", "failure_watch"],
    ["vision_transformer"],
    ["utils", "weight_files"],  # utils sets up processes with devices and failure_watch
    ["datasets"],
    ["augmentations"],  # draws its test images from datasets
    ["features", "warm_start", "timm_models", "run_folder", "slot_drawing"],
    # knn searches features' banks; portable names timm_models' entries; tensorboard_log
    # writes into the run folder
    ["knn", "portable", "tensorboard_log"],
    ["knn_monitor"],  # runs knn during training
    ["main_dino_sparo", "eval_knn", "eval_linear", "embed", "export", "visualize_slots",
     "slot_gallery", "plot_runs", "hubconf"],
    ["run_with_submitit"],  # launches the scripts as jobs
    ["bench.__init__", "bench.measure", "bench.dino_original"],
    ["bench.dino_reference", "bench.augmentation_speed", "bench.knn_speed", "bench.host_syncs",
     "bench.probe_grid_cost", "bench.prototype_precision", "bench.quality", "bench.gpu_check"],
    ["bench.loader_speed", "bench.train_throughput"],
]
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def module_files(root: Path) -> Dict[str, Path]:
    """Module name -> file of every non-test module under root."""
    files = sorted(root.glob("*.py")) + sorted((root / "bench").glob("*.py"))
    return {".".join(path.relative_to(root).with_suffix("").parts): path for path in files}


def imported_names(node: ast.AST) -> List[str]:
    """Every dotted name an import statement may refer to (`from bench import measure` can
    name the module bench.measure)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def project_imports(path: Path, modules: Set[str]) -> Tuple[Set[str], List[str]]:
    """(project modules imported at module level, problems: imports inside a function or class
    body or after the first def/class)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top: Set[str] = set()
    problems: List[str] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            for name in imported_names(child):
                if name not in modules:
                    continue
                if scope:
                    problems.append(f"{path.name}:{child.lineno} imports {name} inside {scope}")
                else:
                    top.add(name)
            visit(child, inner)

    visit(tree, "")
    code_started = False
    for statement in tree.body:
        code_started |= isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        late = [name for name in imported_names(statement) if name in modules]
        if code_started and late:
            problems.append(f"{path.name}:{statement.lineno} imports {late[0]} after the code "
                            f"(an import for its side effect belongs at the top, or nowhere)")
    return top, problems


def dependency_graph(root: Path) -> Tuple[Dict[str, Set[str]], List[str]]:
    files = module_files(root)
    graph, problems = {}, []
    for name, path in files.items():
        graph[name], found = project_imports(path, set(files))
        problems += found
    return graph, problems


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a list of modules (first == last), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def walk(name: str) -> List[str]:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        state[name] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start)
            if cycle:
                return cycle
    return []


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return [f"{name} (layer {LAYER[name]}) imports {target} (layer {LAYER[target]})"
            for name, targets in sorted(graph.items()) for target in sorted(targets)
            if name in LAYER and target in LAYER and LAYER[target] >= LAYER[name]]


def test_the_checker_sees_circles_late_and_inner_imports(tmp_path):
    """The checks themselves, on a made-up project: a <-> b circle, a function-level import,
    an import after the code."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("import os\n\ndef f():\n    import a\n\nimport a\n")
    graph, problems = dependency_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert problems == ["b.py:4 imports a inside f", "b.py:6 imports a after the code (an import "
                        "for its side effect belongs at the top, or nowhere)"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    unplaced = sorted(set(module_files(REPO)) - set(LAYER))
    assert not unplaced, f"give these modules a layer in tests/test_imports.py: {unplaced}"


def test_no_import_of_a_project_module_inside_a_function_or_after_the_code():
    _, problems = dependency_graph(REPO)
    assert not problems, "\n".join(problems)


def test_imports_form_a_tree_along_the_layers():
    graph, _ = dependency_graph(REPO)
    assert find_cycle(graph) == []
    assert upward_imports(graph) == []


def test_vision_transformer_needs_only_torch_timm_and_sparo_head():
    tree = ast.parse((REPO / "vision_transformer.py").read_text())
    roots = {name.split(".")[0] for node in ast.walk(tree) for name in imported_names(node)}
    third_party = {"torch", "timm", "sparo_head"}
    assert roots - third_party <= {"__future__", "argparse", "dataclasses", "functools", "math",
                                   "typing"}, roots
