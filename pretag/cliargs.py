"""Command-line flags from the library's config dataclasses: a setting's type, default and help are written once.

A command names the fields it exposes (``add_fields(p, "pretag.generate", "GenerateConfig", ["top_k", ...])``);
the flag's type and default come from the field, its help from the field's attribute docstring. The dataclass is
read from its module's source (``ast``), never imported: a config that lives beside torch code must not make
``pretag --help`` import torch. A field renamed in the library is a KeyError when the parser is built (tested), not
a flag that silently stops reaching the library.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_DEFAULT = object()  # a field whose default is not a literal (a factory, a module constant)
SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class ConfigField:
    name: str
    type: type | None
    """int, float, str or bool (None: not a scalar, so not a flag)."""
    default: Any
    doc: str


@functools.cache
def config_fields(module: str, cls: str) -> dict[str, ConfigField]:
    """The fields of dataclass ``cls`` in ``module`` as its source declares them, in order."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        raise KeyError(f"{module} has no class {cls}")
    out = {}
    for i, st in enumerate(node.body):
        if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
            continue
        try:
            default = NO_DEFAULT if st.value is None else ast.literal_eval(st.value)
        except ValueError:
            default = NO_DEFAULT
        nxt = node.body[i + 1] if i + 1 < len(node.body) else None
        doc = nxt.value.value if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                                  and isinstance(nxt.value.value, str)) else ""
        kinds = {p.strip() for p in ast.unparse(st.annotation).split("|")} - {"None"}
        kind = SCALARS.get(kinds.pop()) if len(kinds) == 1 else None
        out[st.target.id] = ConfigField(st.target.id, kind, default, " ".join(doc.replace("``", "").split()))
    return out


def add_fields(p, module: str, cls: str, names: list[str], *, flags: dict[str, str] | None = None,
               help: dict[str, str] | None = None, metavar: dict[str, str] | None = None) -> None:
    """Add a flag for each field in ``names`` (``--max-new-tokens`` for ``max_new_tokens`` unless ``flags`` says
    otherwise; the parsed value keeps the flag's name). ``help`` replaces a docstring that speaks of another
    context; the default is appended to the help."""
    fields = config_fields(module, cls)
    for name in names:
        f = fields[name]
        if f.type is None or f.type is bool or f.default is NO_DEFAULT:
            raise TypeError(f"{module}.{cls}.{name}: only scalar fields with a literal default become flags")
        text = (help or {}).get(name, f.doc)
        if text and f.default not in (None, ""):
            text = f"{text.rstrip('.')} (default {f.default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        kw = {"metavar": metavar[name]} if metavar and name in metavar else {}
        p.add_argument((flags or {}).get(name, "--" + name.replace("_", "-")), type=f.type, default=f.default,
                       help=text or None, **kw)
