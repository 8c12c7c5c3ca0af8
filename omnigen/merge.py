"""Edits survive recompiling: a three-way merge of generated files, per top-level unit.

Three versions of each file meet: `base`, what omnigen last wrote (kept in <out>/.omnigen/); `ours`, the file on
disk, perhaps edited by hand; `theirs`, what omnigen writes now. A Python file is cut into its top-level units with
libcst (a function, a class, a constant, an import, the `if __name__` block; each with the comments and blank lines
above it), and every unit is decided alone:
- changed only on disk: the user's version stays (a deletion too);
- changed only by omnigen: omnigen's version is taken;
- changed by both, differently: a conflict, which `resolutions` settles ("ours" or "theirs", per unit or "all").
Units the user added are kept where they stood: before the unit that followed them on disk. Every unit is copied
verbatim from the version it comes from, so whitespace and comments survive byte for byte. Any other file is one
unit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import libcst

ALL = "all"  # a resolution key that settles every conflict not named on its own


@dataclass(frozen=True)
class Unit:
    key: str    # what a user names in --ours / --theirs: a function, class or constant name, or the statement
    code: str   # verbatim, with the comments and blank lines above it


@dataclass(frozen=True)
class Conflict:
    file: str
    key: str
    ours: str | None    # None: deleted on that side
    theirs: str | None

    def describe(self) -> str:
        def lines(code):
            return [] if code is None else code.splitlines(True)
        diff = "".join(difflib.unified_diff(lines(self.ours), lines(self.theirs), f"{self.file}: {self.key} (yours)",
                                            f"{self.file}: {self.key} (omnigen's)"))
        return diff if diff.endswith("\n") else diff + "\n"


@dataclass
class Merged:
    files: dict[str, str] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)   # "file: unit" where the user's edit was kept


def _statement_key(module: libcst.Module, stmt: libcst.CSTNode) -> str:
    if isinstance(stmt, (libcst.FunctionDef, libcst.ClassDef)):
        return stmt.name.value
    if isinstance(stmt, libcst.SimpleStatementLine) and stmt.body:
        small = stmt.body[0]
        if isinstance(small, libcst.Assign) and isinstance(small.targets[0].target, libcst.Name):
            return small.targets[0].target.value
        if isinstance(small, libcst.AnnAssign) and isinstance(small.target, libcst.Name):
            return small.target.value
        if isinstance(small, libcst.Expr) and isinstance(small.value, libcst.SimpleString) and stmt is module.body[0]:
            return "__doc__"
        return module.code_for_node(small).strip()  # an import, a call: the statement is its own name
    # if __name__ == "__main__": and other compound statements: their first line
    return module.code_for_node(stmt.with_changes(leading_lines=())).split("\n", 1)[0].rstrip(":").strip()


def units(code: str) -> list[Unit]:
    """The top-level units of a Python file, in order; keys made unique by a #2, #3 suffix on repeats. The module's
    leading and trailing comments are units of their own ("__header__", "__footer__")."""
    module = libcst.parse_module(code)
    found = [Unit("__header__", "".join(module.code_for_node(line) for line in module.header))]
    seen: dict[str, int] = {}
    for stmt in module.body:
        key = _statement_key(module, stmt)
        seen[key] = seen.get(key, 0) + 1
        found.append(Unit(key if seen[key] == 1 else f"{key}#{seen[key]}", module.code_for_node(stmt)))
    found.append(Unit("__footer__", "".join(module.code_for_node(line) for line in module.footer)))
    return found


def _split(name: str, code: str) -> list[Unit]:
    return units(code) if name.endswith(".py") else [Unit(name, code)]


def merge_file(name: str, base: str | None, ours: str | None, theirs: str,
               resolutions: dict[str, str]) -> tuple[str | None, list[Conflict], list[str]]:
    """(merged text or None on conflict, conflicts, keys of the user's edits kept)."""
    if ours is None or ours == theirs:
        return theirs, [], []
    if base is None:  # no record of what omnigen wrote: every difference is the user's word against omnigen's
        base = ""
    if ours == base:
        return theirs, [], []
    b, o, t = ({u.key: u.code for u in _split(name, text)} for text in (base, ours, theirs))
    out: dict[str, str | None] = {}
    conflicts, kept = [], []
    for key in list(t) + [k for k in o if k not in t]:
        bk, ok, tk = b.get(key), o.get(key), t.get(key)
        if ok == bk or ok == tk:
            out[key] = tk
        elif tk == bk:
            out[key] = ok
            kept.append(key)
        else:
            side = resolutions.get(key, resolutions.get(ALL))
            if side is None:
                conflicts.append(Conflict(name, key, ok, tk))
            out[key] = ok if side == "ours" else tk
    if conflicts:
        return None, conflicts, kept
    return "".join(code for code in _ordered(out, list(o), list(t)) if code), [], kept


def _ordered(chosen: dict[str, str | None], ours_order: list[str], theirs_order: list[str]) -> list[str | None]:
    """omnigen's order, with each unit only the user has placed just before the unit it preceded on disk (the
    footer at the latest)."""
    order = list(theirs_order)
    for i in reversed(range(len(ours_order))):
        key = ours_order[i]
        if key not in order:
            following = next(k for k in ours_order[i + 1:] + ["__footer__"] if k in order)
            order.insert(order.index(following), key)
    return [chosen.get(k) for k in order]


def merge(base: dict[str, str], ours: dict[str, str], theirs: dict[str, str],
          resolutions: dict[str, str] | None = None) -> Merged:
    """Merge every file omnigen writes. `base` / `ours` may lack files (first compile, a deleted file)."""
    result = Merged()
    for name, text in sorted(theirs.items()):
        merged, conflicts, kept = merge_file(name, base.get(name), ours.get(name), text, resolutions or {})
        result.conflicts += conflicts
        result.kept += [f"{name}: {k}" for k in kept]
        if merged is not None:
            result.files[name] = merged
    return result
