#!/usr/bin/env python3
"""scripts/circles.py: finds import circles between the modules of a crate (`make circles`, and CI).

A module is a file (`a.rs` or `a/mod.rs` is `a`, `a/b.rs` is `a::b`). Module A depends on B when A's code
names a path through B: `use crate::b::X`, `crate::b::f()` in an expression, `super::b::X`, `self::b::X`,
or a name the crate root or another module re-exports from B (`crate::AppState` is `state`'s). A parent
also depends on the children it declares (`mod b;`), so a circle through a child is a circle of its
parent. What a module says of its own ancestors is not a dependency (a child is part of its parent), and
`#[cfg(test)]` modules at the end of a file are left out (tests may reach anywhere).

Prints every circle (each strongly connected set of modules, with one path around it) and exits with 1
if there is any. `--graph` prints the dependencies instead; `--self-test` checks the checker on small
crates written for the purpose (a circle it must find, through each kind of path, and a tree it must pass).

    scripts/circles.py backend/src server/src [--graph]
    scripts/circles.py --self-test
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def modules(src):
    """Maps each module path (a tuple of names; () is the root) to its file."""
    found = {}
    for dirpath, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            parts = rel[:-3].split(os.sep)
            if len(parts) == 1 and parts[0] == "main" and os.path.exists(os.path.join(src, "lib.rs")):
                # A binary beside a library is a crate of its own, using the library by name.
                continue
            if parts[-1] in ("lib", "main") and len(parts) == 1:
                parts = []
            elif parts[-1] == "mod":
                parts = parts[:-1]
            found[tuple(parts)] = os.path.join(dirpath, name)
    return found


def code_of(path):
    """The file's code without comments, string contents and its trailing test module."""
    text = open(path, encoding="utf-8").read()
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))? )?mod \w+ \{", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"//[^\n]*", "", text)
    return text


def use_paths(tree):
    """Expands a use tree (`a::{b::C, d}`) into paths (lists of names)."""
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        path = re.sub(r"\bas\w+$", "", tree.replace(" ", ""))
        return [[p for p in path.split("::") if p and p != "*"]]
    head = [p for p in tree[:brace].split("::") if p]
    inner = tree[brace + 1 : tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    out = []
    for part in parts:
        if part:
            for sub in use_paths(part):
                out.append(head + [p for p in sub if p != "self"])
    return out or [head]


def references(module, code):
    """Every absolute path (from the crate root) the module's code names."""
    paths = []
    # `use` statements (the alias, if any, is dropped with the `as`).
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        tree = re.sub(r"\s+as\s+" + IDENT, "", m.group(1))
        paths.extend(use_paths(tree))
    # Paths in expressions and types: `crate::a::b`, `super::a`, `self::a`.
    for m in re.finditer(r"\b((?:crate|super|self)(?:::" + IDENT + r")+)", code):
        paths.append(m.group(1).split("::"))
    out = []
    for path in paths:
        if not path:
            continue
        if path[0] == "crate":
            out.append(tuple(path[1:]))
        elif path[0] in ("super", "self"):
            base = list(module)
            rest = list(path)
            if rest[0] == "self":
                rest = rest[1:]
            while rest and rest[0] == "super":
                base = base[:-1]
                rest = rest[1:]
            out.append(tuple(base + rest))
    return out


def reexports(mods, codes):
    """`pub use x::Y;` in module M makes `M::Y` name x's `Y`: maps (M..., Y) to the path it stands for."""
    table = {}
    for module, code in codes.items():
        for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
            tree = m.group(1)
            for path in use_paths(re.sub(r"\s+as\s+" + IDENT, "", tree)):
                if not path:
                    continue
                if path[0] == "crate":
                    target = tuple(path[1:])
                elif path[0] in ("self", "super"):
                    target = references(module, "use " + "::".join(path) + ";")[0]
                else:
                    target = module + tuple(path)
                table[module + (path[-1],)] = target
    return table


def resolve(path, mods, table, depth=0):
    """The module a path names: its longest prefix that is a module, after following re-exports."""
    for n in range(len(path), -1, -1):
        prefix = path[:n]
        if n < len(path) and prefix + (path[n],) in table and depth < 8:
            return resolve(table[prefix + (path[n],)] + path[n + 1 :], mods, table, depth + 1)
        if prefix in mods:
            return prefix
    return ()


def name(module):
    return "::".join(module) or "(root)"


def graph(src):
    mods = modules(src)
    codes = {m: code_of(f) for m, f in mods.items()}
    table = reexports(mods, codes)
    edges = {m: set() for m in mods}
    for module, code in codes.items():
        for child in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", code, re.M):
            if module + (child,) in mods:
                edges[module].add(module + (child,))
        for path in references(module, code):
            target = resolve(path, mods, table)
            # Itself, or one of its ancestors: part of the same module.
            if target == module[: len(target)]:
                continue
            edges[module].add(target)
    return edges


def circles(edges):
    """Strongly connected sets of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def path_around(edges, group):
    """One cycle through the group's first module, as a list of modules."""
    members = set(group)
    start = group[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                cycle = [v]
                while prev[cycle[-1]] is not None:
                    cycle.append(prev[cycle[-1]])
                return list(reversed(cycle)) + [start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return group


SELF_TEST = {
    # name: (files, whether a circle must be found)
    "use statements": ({"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::B;\n",
                        "b.rs": "use crate::{a::{self, A}};\n"}, True),
    "inline paths": ({"lib.rs": "mod a;\nmod b;\n", "a.rs": "fn f() { crate::b::g() }\n",
                      "b.rs": "use super::a::A;\n"}, True),
    "a re-export at the root": ({"lib.rs": "mod a;\nmod b;\npub use b::B;\n",
                                 "a.rs": "use crate::B;\n", "b.rs": "use crate::a::A;\n"}, True),
    "a child of a module": ({"lib.rs": "mod a;\nmod b;\n", "a.rs": "mod c;\n",
                             "a/c.rs": "use crate::b::B;\n", "b.rs": "use crate::a::A;\n"}, True),
    "a tree (children use parents, tests anywhere)": (
        {"lib.rs": "mod a;\nmod b;\npub use a::A;\n", "a.rs": "mod c;\nuse crate::b::B;\n",
         "a/c.rs": "use super::A;\nuse crate::Result;\n// crate::b::nothing in a comment\n",
         "b.rs": "pub struct B;\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n"}, False),
}


def self_test():
    import tempfile

    failed = False
    for name, (files, circular) in SELF_TEST.items():
        with tempfile.TemporaryDirectory() as src:
            for path, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(src, path)), exist_ok=True)
                with open(os.path.join(src, path), "w", encoding="utf-8") as f:
                    f.write(text)
            found = bool(circles(graph(src)))
        if found != circular:
            failed = True
            print(f"self-test: {name}: {'found a circle' if found else 'found no circle'}, wrongly")
    if not failed:
        print(f"self-test: {len(SELF_TEST)} cases as expected")
    return 1 if failed else 0


def main(args):
    if "--self-test" in args:
        return self_test()
    show = "--graph" in args
    roots = [a for a in args if not a.startswith("--")]
    failed = False
    for src in roots:
        edges = graph(src)
        if show:
            for m in sorted(edges):
                print(f"{src}: {name(m)} -> {', '.join(name(t) for t in sorted(edges[m]))}")
            continue
        found = circles(edges)
        for group in found:
            failed = True
            around = " -> ".join(name(m) for m in path_around(edges, group))
            print(f"{src}: import circle among {', '.join(name(m) for m in group)}: {around}")
        if not found:
            print(f"{src}: no import circles ({len(edges)} modules)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
