"""Issue 28's measures, kept: no module of lomo_jax/ or lomo_torch/ over 400 lines of
code, no function over 60 (docstrings, comments and blank lines not counted; a
function's nested functions count toward it), and no C/C++ source in lomo_torch."""

import ast
import io
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lomo_jax", "lomo_torch")


def _docstring_lines(tree) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str, tree) -> set:
    """Line numbers that hold code (a token other than a comment, outside docstrings)."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENDMARKER}
    docs, lines = _docstring_lines(tree), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return lines


def measures():
    """``(module, code lines)`` and ``(module:function, code lines)`` of both packages."""
    modules, functions = [], []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            tree = ast.parse(source)
            lines = code_lines(source, tree)
            name = str(path.relative_to(ROOT))
            modules.append((name, len(lines)))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = [n for n in lines if node.lineno <= n <= node.end_lineno]
                    functions.append((f"{name}:{node.name}", len(body)))
    return modules, functions


def test_no_module_over_400_and_no_function_over_60_lines_of_code():
    modules, functions = measures()
    assert len(modules) > 50  # both packages were read
    assert [m for m in modules if m[1] > 400] == []
    assert [f for f in functions if f[1] > 60] == []


def test_counting_skips_docstrings_and_comments_only():
    source = 'def f():\n    """Doc\n    string."""\n    # note\n    x = 1\n\n    return x\n'
    assert sorted(code_lines(source, ast.parse(source))) == [1, 5, 7]


def test_lomo_torch_carries_no_compiled_source():
    found = [p.name for p in (ROOT / "lomo_torch").rglob("*")
             if p.suffix in {".c", ".cc", ".cpp", ".cu", ".h", ".so", ".pyd"}]
    assert found == []
