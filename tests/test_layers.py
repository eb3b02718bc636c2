"""The package's layers: core <- zoo <- methods <- evaluation; no layer imports one below it."""

from flows.imports import ROOT, _imported

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
