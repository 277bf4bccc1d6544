"""Error injection: subtly wrong copies of correct Python functions, made by AST edits, with the edit recorded.

The bug types are HumanEvalFix's:
  * operator misuse   a binary, comparison, boolean or augmented-assignment operator swapped (+ -> -, < -> <=)
  * value misuse      a constant changed (n -> n + 1, True -> False, "x" -> "xx")
  * variable misuse   a variable read replaced by another variable of the same function
  * function misuse   a call to a builtin or method swapped for a related one (min -> max, lower -> upper)
  * missing logic     a statement deleted, an operand of `and` / `or` dropped, an `else` branch removed
  * excess logic      a side-effect statement executed twice, or a condition given an extra `and` clause

Both the original and the variant are printed by `ast.unparse`, so the two texts differ exactly where the
edit is (formatting and comments cannot differ). Variants are reproducible: the same source, bug type and
seed give the same edit. Every variant compiles. With `check`, a callable that runs a test against code,
only variants that fail the test are returned (an edit that happens to keep the behaviour is skipped).
"""
import ast
import copy
import random
from dataclasses import dataclass

BUG_TYPES = ("value misuse", "missing logic", "excess logic", "operator misuse", "variable misuse", "function misuse")

_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult,
                ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift,
                ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr}
_COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                  ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_FUNCTION_SWAPS = {"min": "max", "max": "min", "any": "all", "all": "any", "sorted": "reversed", "str": "repr",
                   "round": "int", "list": "sorted", "abs": "int", "sum": "max", "len": "sum"}
_METHOD_SWAPS = {"lower": "upper", "upper": "lower", "startswith": "endswith", "endswith": "startswith",
                 "lstrip": "rstrip", "rstrip": "lstrip", "strip": "lstrip", "find": "rfind", "rfind": "find",
                 "index": "rindex", "rindex": "index", "append": "extend", "extend": "append", "keys": "values",
                 "values": "keys", "floor": "ceil", "ceil": "floor", "isdigit": "isalpha", "isalpha": "isdigit",
                 "split": "rsplit", "rsplit": "split", "add": "discard", "sort": "reverse", "reverse": "sort",
                 "pop": "copy", "insert": "append", "get": "setdefault", "remove": "discard", "join": "split"}


@dataclass(frozen=True)
class Edit:
    bug_type: str
    description: str  # e.g. "operator + -> -"
    line: int  # 1-based line of the edit in the original (unparsed) code
    before: str  # the edited node's source before the edit
    after: str  # and after


@dataclass(frozen=True)
class Variant:
    original: str  # the correct code, as ast.unparse prints it
    buggy: str
    edit: Edit


def normalize(source):
    """`source` as ast.unparse prints it (the form originals and variants share)."""
    return ast.unparse(ast.parse(source))


def _local_names(tree):
    """Local variable names of the function(s) in `tree`: parameters and assigned names."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _is_docstring(parent, node):
    return (isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and parent.body
            and isinstance(parent.body[0], ast.Expr) and parent.body[0].value is node)


def _statement_lists(tree):
    """(owner node, field name) of every statement list (bodies, else branches)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield node, field


def _sites(tree):
    """Every possible edit as (bug_type, node index in ast.walk order, action, argument)."""
    nodes = list(ast.walk(tree))
    index = {id(node): i for i, node in enumerate(nodes)}
    parents = {id(child): node for node in nodes for child in ast.iter_child_nodes(node)}
    local_names = _local_names(tree)
    sites = []
    for i, node in enumerate(nodes):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP_SWAPS:
            sites.append(("operator misuse", i, "binop", None))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE_SWAPS:
            sites.append(("operator misuse", i, "compare", None))
        elif isinstance(node, ast.BoolOp):
            sites.append(("operator misuse", i, "boolop", None))
            sites.append(("missing logic", i, "drop_operand", None))
        elif isinstance(node, ast.Constant) and not _is_docstring(parents.get(id(node)), node) \
                and not isinstance(parents.get(id(node)), ast.JoinedStr):  # f-string pieces print differently
            if isinstance(node.value, (bool, int, str)) and not (isinstance(node.value, str) and len(node.value) > 20):
                sites.append(("value misuse", i, "constant", None))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in local_names:
            others = sorted(local_names - {node.id, "self", "cls"})
            if others and node.id not in ("self", "cls"):
                sites.append(("variable misuse", i, "variable", others))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _FUNCTION_SWAPS:
                sites.append(("function misuse", i, "function", None))
            elif isinstance(func, ast.Attribute) and func.attr in _METHOD_SWAPS:
                sites.append(("function misuse", i, "method", None))
        if isinstance(node, ast.If) and node.orelse and not (len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If)):
            sites.append(("missing logic", i, "drop_else", None))
        if isinstance(node, (ast.If, ast.While)):
            candidates = sorted(local_names - {"self", "cls"})
            if candidates:
                sites.append(("excess logic", i, "extra_condition", candidates))
    for owner, field in _statement_lists(tree):
        statements = getattr(owner, field)
        for position, statement in enumerate(statements):
            if len(statements) >= 2 and not _is_docstring(owner, getattr(statement, "value", None)) \
                    and not isinstance(statement, (ast.FunctionDef, ast.ClassDef, ast.Global, ast.Nonlocal)):
                sites.append(("missing logic", index[id(owner)], "delete_statement", (field, position)))
            if isinstance(statement, ast.AugAssign) or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
                sites.append(("excess logic", index[id(owner)], "duplicate_statement", (field, position)))
    return sites


def _mutate_constant(value, rng):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value <= 0 or rng.random() < 0.5 else value - 1
    return value + value[:1] if value else " "


def _apply(tree, site, rng):
    """Apply `site` to `tree` (a copy, edited in place); returns (description, edited node, before source)."""
    bug_type, i, action, argument = site
    node = list(ast.walk(tree))[i]
    before = ast.unparse(node)
    if action == "binop":
        old = type(node.op)
        node.op = _BINOP_SWAPS[old]()
        return f"operator {_SYMBOLS.get(old)} -> {_SYMBOLS.get(type(node.op))}", node, before
    if action == "compare":
        old = type(node.ops[0])
        node.ops = [_COMPARE_SWAPS[old]()]
        return f"comparison {_SYMBOLS.get(old)} -> {_SYMBOLS.get(type(node.ops[0]))}", node, before
    if action == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return f"boolean operator -> {'or' if isinstance(node.op, ast.Or) else 'and'}", node, before
    if action == "drop_operand":
        dropped = rng.randrange(len(node.values))
        del node.values[dropped]
        return f"condition operand {dropped} removed", node, before
    if action == "constant":
        old = node.value
        node.value = _mutate_constant(old, rng)
        return f"constant {old!r} -> {node.value!r}", node, before
    if action == "variable":
        old = node.id
        node.id = rng.choice(argument)
        return f"variable {old} -> {node.id}", node, before
    if action == "function":
        old = node.func.id
        node.func.id = _FUNCTION_SWAPS[old]
        return f"function {old} -> {node.func.id}", node, before
    if action == "method":
        old = node.func.attr
        node.func.attr = _METHOD_SWAPS[old]
        return f"method .{old} -> .{node.func.attr}", node, before
    if action == "drop_else":
        node.orelse = []
        return "else branch removed", node, before
    if action == "extra_condition":
        extra = ast.Name(id=rng.choice(argument), ctx=ast.Load())
        node.test = ast.BoolOp(op=ast.And(), values=[node.test, extra])
        return f"extra condition `and {extra.id}`", node, before
    field, position = argument
    statements = getattr(node, field)
    statement = statements[position]
    before = ast.unparse(statement)
    if action == "delete_statement":
        del statements[position]
        return "statement removed", statement, before
    statements.insert(position + 1, copy.deepcopy(statement))
    return "statement duplicated", statement, before


_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
            ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Lt: "<",
            ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
            ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


def available_bug_types(source):
    """The bug types that have at least one edit site in `source`."""
    return sorted({site[0] for site in _sites(ast.parse(source))})


def inject(source, bug_type=None, seed=0, check=None, max_tries=8):
    """A Variant of `source` with one bug of `bug_type` (any type when None), or None if none can be made.

    `check(code) -> bool`: True when the code passes its test. With it, a variant is returned only if it
    fails (up to max_tries edits are tried)."""
    if bug_type is not None and bug_type not in BUG_TYPES:
        raise ValueError(f"unknown bug type {bug_type!r}; use one of {', '.join(BUG_TYPES)}")
    original = normalize(source)
    tree = ast.parse(original)  # line numbers then refer to `original`
    rng = random.Random(f"{seed}:{bug_type}:{original}")  # a str seed hashes stably (not salted)
    sites = [s for s in _sites(tree) if bug_type is None or s[0] == bug_type]
    rng.shuffle(sites)
    for site in sites[:max_tries] if check is not None else sites:
        edited = copy.deepcopy(tree)
        description, node, before = _apply(edited, site, rng)
        buggy = ast.unparse(edited)
        if buggy == original:
            continue
        try:
            compile(buggy, "<variant>", "exec")
        except SyntaxError:  # e.g. a deleted statement left a `return` outside its loop's context
            continue
        after = "" if description == "statement removed" else ast.unparse(node)
        if check is not None and check(buggy):
            continue  # the edit kept the behaviour the test checks
        return Variant(original, buggy, Edit(site[0], description, getattr(node, "lineno", 0), before, after))
    return None
