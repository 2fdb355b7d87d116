"""Saved folders that load without looplm: one self-contained modeling file, generated at save time.

`LoopLMForCausalLM.save_pretrained` writes `modeling_looplm.py` next to the weights and sets the
config's `auto_map`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works
where only torch and transformers are installed. The file is not a hand-kept copy of the model: it
is looplm's own modules (`model` and what it imports, nothing else), concatenated in dependency order
with their relative imports removed. Module-level code of `looplm/__init__.py` (the Auto* registration
of model_type "ouro") is not part of it; in a clean environment `auto_map` does that job.

Generation is checked, not hoped for: a relative import anywhere but at a module's top level, a name
bound at top level by two modules (other than the same absolute import), or any import of looplm,
pretrain, posttrain, runtime or deepspeed stops it with an error naming the module.

This module is itself part of the file (model.py imports it): run from the file, `bundle_source`
returns the file's own text, so a model loaded with trust_remote_code saves a folder that is
self-contained in the same way.
"""

import ast
import importlib.metadata
from pathlib import Path

MODULE_FILE = "modeling_looplm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_looplm.LoopLMConfig",
    "AutoModel": "modeling_looplm.LoopLMModel",
    "AutoModelForCausalLM": "modeling_looplm.LoopLMForCausalLM",
}
ROOT_MODULE = "model"  # the file holds this module of looplm and every module it imports
FORBIDDEN_IMPORTS = ("looplm", "pretrain", "posttrain", "runtime", "deepspeed")


def write_remote_code(save_directory, config) -> Path:
    """Write the modeling file into `save_directory` and point `config.auto_map` at it. The caller
    saves the config (and writes on the main process only)."""
    config.auto_map = dict(AUTO_MAP)  # a copy: transformers edits a config's auto_map in place
    path = Path(save_directory) / MODULE_FILE
    path.write_text(bundle_source(), encoding="utf-8")
    return path


def bundle_source() -> str:
    """The text of modeling_looplm.py: built from looplm's sources, or, when this code runs from the
    generated file itself (a folder loaded with trust_remote_code), that file's own text."""
    here = Path(__file__)
    if here.name == MODULE_FILE:
        return here.read_text(encoding="utf-8")
    return build_bundle(here.parent)


class BundleError(RuntimeError):
    """looplm's sources cannot be turned into one self-contained file; the message names the module."""


def build_bundle(package_dir) -> str:
    package_dir = Path(package_dir)
    order = _dependency_order(package_dir, ROOT_MODULE)
    modules = {name: _parse(package_dir, name) for name in order}
    _check_names(modules)
    futures, sections = [], []
    for name in order:
        future, text = _section(name, *modules[name])
        futures += [f for f in future if f not in futures]
        sections.append(text)
    try:
        version = importlib.metadata.version("looplm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = "unknown"
    header = (
        f'"""Generated from looplm version {version} by looplm/remote_code.py: do not edit.\n\n'
        "Self-contained modeling code of a looplm checkpoint (Ouro format): with this file next to the\n"
        "weights and config.json's `auto_map`, `AutoModelForCausalLM.from_pretrained(folder,\n"
        "trust_remote_code=True)` loads the model with only torch and transformers installed. Below are\n"
        "looplm's modules, in dependency order, without their relative imports:\n"
        f"{', '.join(order)}.\n"
        '"""\n'
    )
    text = header + "".join(f"{line}\n" for line in futures) + "\n" + "\n\n".join(sections)
    _check_bundle(text)
    return text


def _parse(package_dir: Path, name: str):
    path = package_dir / f"{name}.py"
    source = path.read_text(encoding="utf-8")
    return source, ast.parse(source, filename=str(path))


def _relative_imports(name: str, tree: ast.Module) -> list[ast.ImportFrom]:
    """The module's relative imports; each must be a top-level `from .module import names`."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        where = f"looplm/{name}.py line {node.lineno}"
        if id(node) not in top:
            raise BundleError(f"{where}: a relative import inside a block or function cannot be bundled; "
                              "move it to the module's top level")
        if node.level != 1 or not node.module:
            raise BundleError(f"{where}: only `from .module import name` can be bundled")
        if any(alias.name == "*" for alias in node.names):
            raise BundleError(f"{where}: `import *` cannot be bundled; name the imported objects")
        found.append(node)
    return found


def _dependency_order(package_dir: Path, root: str) -> list[str]:
    order, visiting = [], []

    def visit(name):
        if name in order:
            return
        if name in visiting:
            raise BundleError(f"relative imports form a cycle: {' -> '.join(visiting + [name])}")
        visiting.append(name)
        _, tree = _parse(package_dir, name)
        for node in _relative_imports(name, tree):
            visit(node.module)
        visiting.pop()
        order.append(name)

    visit(root)
    return order


def _bindings(name: str, tree: ast.Module) -> dict[str, tuple]:
    """Names a module binds at top level -> what they are: ("import", module, name) for an absolute
    import (two modules may share one), ("def", module) for anything the module defines itself."""
    found = {}

    def own(binding):
        found[binding] = ("def", name)

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own(child.name)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.asname:
                        found[alias.asname] = ("import", alias.name, None)
                    else:
                        top = alias.name.split(".")[0]
                        found[top] = ("import", top, None)
            elif isinstance(child, ast.ImportFrom):
                for alias in child.names:
                    if child.level and alias.asname not in (None, alias.name):
                        own(alias.asname)  # becomes an assignment in the file
                    elif not child.level and child.module != "__future__":
                        found[alias.asname or alias.name] = ("import", child.module, alias.name)
            elif isinstance(child, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                continue  # own scopes
            else:
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    own(child.id)
                elif isinstance(child, ast.ExceptHandler) and child.name:
                    own(child.name)
                visit(child)

    visit(tree)
    for node in ast.walk(tree):  # `global x` in a function binds a module-level name too
        if isinstance(node, ast.Global):
            for binding in node.names:
                found.setdefault(binding, ("def", name))
    return found


def _check_names(modules: dict) -> None:
    """One namespace for all modules: a name bound by two of them must be the same absolute import,
    and every name a relative import takes must exist in its module."""
    seen, bound = {}, {}
    for name, (_, tree) in modules.items():
        bindings = bound[name] = _bindings(name, tree)
        for binding, what in bindings.items():
            if binding in seen and (what[0] != "import" or seen[binding][1] != what):
                raise BundleError(f"name clash in the bundled file: {binding!r} is bound by looplm/"
                                  f"{seen[binding][0]}.py and looplm/{name}.py; rename one of them")
            seen.setdefault(binding, (name, what))
        for node in _relative_imports(name, tree):
            for alias in node.names:
                if alias.name not in bound[node.module]:
                    raise BundleError(f"looplm/{name}.py imports {alias.name!r} from .{node.module}, which "
                                      "does not define it at top level")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for imported in names:
                if imported.split(".")[0] in FORBIDDEN_IMPORTS:
                    raise BundleError(f"looplm/{name}.py line {node.lineno} imports {imported}, which a "
                                      "checkpoint's modeling file must not need")


def _section(name: str, source: str, tree: ast.Module) -> tuple[list[str], str]:
    """A module's text for the file: its docstring as comments, relative imports removed (names
    imported under another name become assignments), `from __future__` imports returned to hoist."""
    lines = source.splitlines()
    replace = {}  # first line (0-based) -> (last line, replacement lines)
    futures = []
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0].value.value.strip().splitlines()
        replace[body[0].lineno - 1] = (body[0].end_lineno - 1, [f"# {line}".rstrip() for line in doc])
    spans = [(node.lineno, node.end_lineno) for node in body]
    for node in body:
        relative = isinstance(node, ast.ImportFrom) and node.level
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if not (relative or future):
            continue
        if sum(first <= node.end_lineno and node.lineno <= last for first, last in spans) > 1:
            raise BundleError(f"looplm/{name}.py line {node.lineno}: an import that shares its line with "
                              "another statement cannot be bundled")
        if future:
            futures.append(ast.get_source_segment(source, node))
            replace[node.lineno - 1] = (node.end_lineno - 1, [])
        else:
            aliases = [f"{alias.asname} = {alias.name}" for alias in node.names
                       if alias.asname not in (None, alias.name)]
            replace[node.lineno - 1] = (node.end_lineno - 1, aliases)
    out, i = [f"# ---- looplm/{name}.py ----"], 0
    while i < len(lines):
        if i in replace:
            last, new = replace[i]
            out += new
            i = last + 1
        else:
            out.append(lines[i])
            i += 1
    return futures, "\n".join(out).strip() + "\n"


def _check_bundle(text: str) -> None:
    tree = ast.parse(text, filename=MODULE_FILE)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise BundleError(f"{MODULE_FILE} line {node.lineno} still has a relative import")
