"""The package's layers: core <- zoo <- methods <- evaluation; no layer imports one below it."""

from pathlib import Path

from flows.imports import ROOT, _imported, import_closure, module_file

LAYERS = ["core", "zoo", "methods", "evaluation"]


def _violations(layers: list[str]) -> list[str]:
    """'file imports module' for every import of a later layer from an earlier one."""
    out = []
    for rank, layer in enumerate(layers):
        for path in sorted((ROOT / "deepalign" / layer).rglob("*.py")):
            for name in _imported(path):
                parts = name.split(".")
                if len(parts) > 1 and parts[1] in layers[rank + 1 :]:
                    out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_no_layer_imports_a_later_one():
    assert _violations(LAYERS) == []


def test_a_reversed_order_is_caught():
    assert _violations(list(reversed(LAYERS)))  # twin: evaluation imports methods, zoo, core


def test_methods_do_not_import_the_registry_from_deep_align():
    """DEEP-ALIGN's model and training never import the aligner registry (no import cycle)."""
    for path in (ROOT / "deepalign" / "methods" / "deep_align").glob("*.py"):
        registry = {
            n
            for n in _imported(path)
            if (n == "deepalign.methods" or n.startswith("deepalign.methods."))
            and not n.startswith("deepalign.methods.deep_align")
        }
        assert registry == set(), path


# --- no import cycle: a module never runs, through its imports, back into itself ----------------


def _module_graph() -> dict[str, set[str]]:
    """Each deepalign file -> the deepalign files its import statements name (a package's
    __init__ only where the package itself is imported, not as the parent of a module)."""
    graph = {}
    for path in sorted((ROOT / "deepalign").rglob("*.py")):
        found = (module_file(n) for n in _imported(path) if n.startswith("deepalign"))
        graph[str(path.relative_to(ROOT))] = {
            str(f.relative_to(ROOT)) for f in found if f is not None and f != path
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its files, the first repeated at the end), or [] when there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return []


def test_no_import_cycle_among_deepalign_modules():
    assert _cycle(_module_graph()) == []


def test_an_import_cycle_is_found():
    graph = _module_graph()  # twin: the circle arch -> chain -> arch that registration removed
    graph["deepalign/core/arch.py"].add("deepalign/core/chain.py")
    assert _cycle(graph) == [
        "deepalign/core/arch.py",
        "deepalign/core/chain.py",
        "deepalign/core/arch.py",
    ]


def test_every_architecture_record_kind_is_registered_where_checkpoints_load():
    """A module registering a record kind (`@record_kind`) is imported by deepalign.io, so
    `arch_from_dict` knows every kind wherever a checkpoint or zoo is read."""
    registering = {
        path.relative_to(ROOT)
        for path in (ROOT / "deepalign").rglob("*.py")
        if "@record_kind(" in path.read_text()
    }
    assert {Path("deepalign/core/chain.py"), Path("deepalign/core/resnet.py")} <= registering
    assert registering <= import_closure("deepalign.io")
    assert not registering <= import_closure("deepalign.core.arch")  # twin: arch alone has none
