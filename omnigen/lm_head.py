"""Can the generated script compute the loss inside the model's LM head, a chunk of tokens at a time?

The chunked loss (templates/sections/chunked_loss.py.j2) gives the LM head a forward that returns the summed cross
entropy instead of logits, so the model's own forward must hand the head's output to `logits=` untouched. The model's
forward is read, not run (vision and audio towers do not run on meta): its source, parsed. Models that scale, cap or
slice the logits after the head (Granite's logits_scaling, Gemma-style softcapping, padded vocabularies), that call
the head inside a sub-model, or that read the logits outside their own labels branch keep the whole-sequence loss.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn


def chunked_loss_refusal(model: nn.Module) -> str:
    """Why the loss cannot be computed inside this model's LM head ("" when it can)."""
    cls = type(model).__name__
    head = model.get_output_embeddings()
    path = next((p for p, m in model.named_modules() if m is head), "")
    if not path or "." in path:
        return f"{cls}'s LM head ({path or 'none'}) is called by a sub-model's forward, not by {cls}.forward"
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(type(model).forward)))
    except (OSError, TypeError):
        return f"the source of {cls}.forward is not available"
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_self_attr(n.func, path)]
    kept = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and n.value in calls
            and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]
    if len(calls) != 1 or len(kept) != 1:
        return f"{cls}.forward does not keep the output of one self.{path}(...) call in a variable"
    assign = kept[0]
    name = assign.targets[0].id
    for node in ast.walk(tree):
        if node is not assign and _binds(node, name):
            return f"{cls}.forward changes the LM head's output before returning it: `{ast.unparse(node)}`"
    for node in _reads(tree, name):
        return f"{cls}.forward reads the LM head's output outside its labels branch: `{ast.unparse(node)}`"
    return ""


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _binds(node: ast.AST, name: str) -> bool:
    """`node` assigns to `name` (plain, augmented, annotated, walrus or loop target)."""
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr, ast.For)) else [])
    return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))


def _reads(tree: ast.AST, name: str):
    """Expressions that read `name`, other than `logits=name` and inside `if labels is not None:` (the script passes
    no labels: that block never runs)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _labels_given(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        if isinstance(node, ast.keyword) and node.arg == "logits" and isinstance(node.value, ast.Name):
            skipped.add(id(node.value))
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load) and id(node) not in skipped:
            yield parents.get(id(node), node)


def _labels_given(test: ast.AST) -> bool:
    """`if labels is not None:` or `if labels:`."""
    if isinstance(test, ast.Name):
        return test.id == "labels"
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "labels"
            and isinstance(test.ops[0], ast.IsNot) and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None)
