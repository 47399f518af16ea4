"""The package's import graph: no circles, and the layers stay apart
(``lomo_jax.sharding`` needs no model code; the model does not import its
Hugging Face converter). Read from the source with ``ast`` (no imports run);
imports under ``if TYPE_CHECKING:`` are type hints and do not count."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "lomo_jax"


def _modules() -> dict:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(tree, name: str, is_pkg: bool, mods) -> set:
    hints = {id(n) for top in tree.body if isinstance(top, ast.If)
             and "TYPE_CHECKING" in ast.unparse(top.test) for n in ast.walk(top)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out |= {sub} if sub in mods else ({base} if base in mods else set())
    return out


@pytest.fixture(scope="module")
def graph() -> dict:
    mods = _modules()
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", mods)
            for m, p in mods.items()}


def _reach(graph, start) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circles(graph):
    """No module reaches itself, lazy (in-function) imports included."""
    circles = sorted(m for m in graph if m in _reach(graph, m))
    assert not circles, f"modules on an import circle: {circles}"


def test_sharding_needs_no_model_code(graph):
    reached = _reach(graph, "lomo_jax.sharding")
    assert not {m for m in reached if m.startswith("lomo_jax.models")}, reached


def test_model_does_not_import_its_converter(graph):
    assert "lomo_jax.models.convert" not in _reach(graph, "lomo_jax.models.llama")


def test_llama_config_is_registered_with_the_generic_shardings():
    """``lomo_jax.sharding.llama_shardings`` (generic ``model_shardings``) reads a
    LlamaConfig's shapes through the registry the model fills."""
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4)
    assert lsh.param_shapes_of(cfg) == llama.param_shapes(cfg)
    params = {"embed": {"embedding": 1}}
    assert lsh.param_shapes_of(params) is params
    assert llama.llama_shardings is lsh.llama_shardings is lsh.model_shardings
