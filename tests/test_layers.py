"""The layers import one way: core <- rewards, core <- policies, and rl over all three.

Walks every import statement (module level and inside functions) of the package's source files, so a lazy
import cannot hide an edge either.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": set(), "rewards": {"core"}, "policies": {"core"}, "rl": {"core", "rewards", "policies"}}


def tandem_imports(path: Path):
    """(line, imported tandem layer) of every import of ``tandem.*`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tandem" and len(parts) > 1:
                yield node.lineno, parts[1]
            elif parts[0] in LAYERS:  # a bare top-level import of a layer: shadowed by any user module of that name
                yield node.lineno, f"bare:{parts[0]}"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_only_the_layers_below(layer):
    allowed = LAYERS[layer] | {layer}
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for path in sorted((ROOT / layer).rglob("*.py")) for line, target in tandem_imports(path)
           if target not in allowed]
    assert not bad, "\n".join(bad)


def test_the_walk_sees_lazy_and_bare_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tandem.rl.config import JobConfig\n    import rewards.base\n")
    assert list(tandem_imports(source)) == [(2, "rl"), (3, "bare:rewards")]
