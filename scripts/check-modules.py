#!/usr/bin/env python3
"""Rooms point one way: no import circle between the modules of a crate, and nothing below a
crate's root reaches up into it for more than the names it re-exports.

For every crate of the workspace this reads the module tree from `src/lib.rs` (following `mod`
declarations to their files; `#[cfg(test)]` modules are left out: tests may look anywhere), and
every path a module names: `use` lines (with their `{...}` groups) and `crate::`/`super::`/
`self::` paths in code. A path is resolved to the deepest module it names, or, for a name the
root re-exports (`pub use app::Application`), to the module it comes from. Two graphs are
checked for cycles: one of the module files, one of the crate's top-level modules (a wing that
imports another wing that imports it back is a circle even when no single file is).

Usage: scripts/check-modules.py [--graph] [crate dir...]   (default: every workspace member)
Exit 1 on a finding, printing each circle and each reach into the root.
"""
import re
import sys
from pathlib import Path

ROOT = Path.cwd()


def workspace_members():
    text = (ROOT / "Cargo.toml").read_text()
    block = re.search(r"members\s*=\s*\[(.*?)\]", text, re.S).group(1)
    return [ROOT / m for m in re.findall(r'"([^"]+)"', block)]


def strip(source):
    """The code without comments, string literals and `#[cfg(test)]` items."""
    out, i, n = [], 0, len(source)
    while i < n:
        c = source[i]
        if source.startswith("//", i):
            j = source.find("\n", i)
            i = n if j < 0 else j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"' or (c == "r" and re.match(r'r#*"', source[i:i + 8])):
            m = re.match(r'r(#*)"', source[i:])
            if m:
                end = '"' + m.group(1)
                j = source.find(end, i + len(m.group(0)))
                i = n if j < 0 else j + len(end)
            else:
                j = i + 1
                while j < n and source[j] != '"':
                    j += 2 if source[j] == "\\" else 1
                i = j + 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", source[i:i + 4]):
            i += len(re.match(r"'(\\.|[^\\'])'", source[i:]).group(0))
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    # drop `#[cfg(test)]` items (a `mod tests { ... }`, or a test-only fn or use)
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*", code)
        if not m:
            return code
        j = m.end()
        # the item runs to its matching closing brace, or to a `;` before any brace
        brace, semi = code.find("{", j), code.find(";", j)
        if semi >= 0 and (brace < 0 or semi < brace):
            code = code[:m.start()] + code[semi + 1:]
            continue
        depth, k = 0, brace
        while k < len(code):
            if code[k] == "{":
                depth += 1
            elif code[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        code = code[:m.start()] + code[k + 1:]


class Module:
    def __init__(self, path, file, parent):
        self.path = path  # tuple of names from the crate root
        self.file = file
        self.parent = parent
        self.children = {}
        self.code = strip(file.read_text())
        self.reexports = {}  # name -> path it comes from (root only matters)
        self.items = set()  # names of items defined in the file


def load_tree(src):
    root = Module((), src / "lib.rs", None)
    stack = [root]
    while stack:
        m = stack.pop()
        here = m.file.parent if m.file.name in ("lib.rs", "mod.rs") else m.file.with_suffix("")
        for name in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", m.code, re.M):
            for f in (here / f"{name}.rs", here / name / "mod.rs"):
                if f.exists():
                    child = Module(m.path + (name,), f, m)
                    m.children[name] = child
                    stack.append(child)
                    break
        m.items = set(re.findall(
            r"^(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:fn|struct|enum|trait|type|const|static|union)\s+(\w+)",
            m.code, re.M))
        m.items |= set(re.findall(r"^macro_rules!\s*(\w+)", m.code, re.M))
    return root


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [re.sub(r"as\w+$", "", tree)]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        parts.append(cur)
    out = []
    for p in parts:
        for e in expand_use(p):
            out.append(prefix + e)
    return out


def paths_named(m):
    code = m.code
    named = []
    for use in re.findall(r"\buse\s+([^;]+);", code):
        named += expand_use(use)
    # paths in code: crate::a::b, super::a, self::a (`$crate` in macros is the caller's)
    named += re.findall(r"(?<![\w$])((?:crate|super|self)(?:::\w+)+)", code)
    return [p.replace(" ", "") for p in named]


def resolve(m, path, root):
    """The module a path names, or None for another crate's."""
    segs = path.split("::")
    if segs[0] == "crate":
        at, rest = root, segs[1:]
    elif segs[0] == "super":
        at, rest = m.parent or m, segs[1:]
        while rest and rest[0] == "super":
            at, rest = at.parent or at, rest[1:]
    elif segs[0] == "self":
        at, rest = m, segs[1:]
    else:
        # `use name::...` of a child module without `self::` (2018 paths)
        if segs[0] in m.children:
            at, rest = m, segs
        else:
            return None
    for s in rest:
        if s in at.children:
            at = at.children[s]
        elif at is root and s in root.reexports:
            return resolve(root, root.reexports[s], root)
        else:
            break
    return at


def top(m):
    while m.parent is not None and m.parent.parent is not None:
        m = m.parent
    return m


def cycles(edges):
    """Every elementary circle's nodes, found by DFS (graphs here are small)."""
    found, seen = [], set()
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})

    def dfs(start, node, trail):
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                key = frozenset(trail)
                if key not in seen:
                    seen.add(key)
                    found.append(trail + [start])
            elif nxt not in trail and nodes.index(nxt) > nodes.index(start):
                dfs(start, nxt, trail + [nxt])

    for n in nodes:
        dfs(n, n, [n])
    return found


def check_crate(crate, show_graph):
    src = crate / "src"
    if not (src / "lib.rs").exists():
        return []
    root = load_tree(src)
    for path in re.findall(r"^pub\s+use\s+([^;]+);", root.code, re.M):
        for p in expand_use(path):
            name = p.split("::")[-1]
            root.reexports[name] = "crate::" + p if not p.startswith("crate::") else p
    modules, stack = [], [root]
    while stack:
        m = stack.pop()
        modules.append(m)
        stack += m.children.values()
    name = lambda m: "::".join(m.path) or "(root)"
    file_edges, wing_edges, findings = {}, {}, []
    for m in modules:
        if m is root:
            continue
        for p in paths_named(m):
            target = resolve(m, p, root)
            if target is None or target is m:
                continue
            if target is root:
                item = p.split("::")[1] if p.startswith("crate::") and "::" in p else None
                if item in root.items:
                    findings.append(f"{crate.name}: {name(m)} reaches up into the crate root for {p}")
                continue
            # a module naming its own ancestor for a child's name is resolved to the child above
            file_edges.setdefault(name(m), set()).add(name(target))
            a, b = top(m), top(target)
            if a is not b:
                wing_edges.setdefault(name(a), set()).add(name(b))
    for kind, edges in (("module", file_edges), ("top-level module", wing_edges)):
        for c in cycles(edges):
            findings.append(f"{crate.name}: {kind} circle: {' -> '.join(c)}")
    if show_graph:
        print(f"{crate.name}:")
        for a in sorted(wing_edges):
            print(f"  {a} -> {', '.join(sorted(wing_edges[a]))}")
    return findings


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show = "--graph" in sys.argv
    crates = [Path(a).resolve() for a in args] or workspace_members()
    findings = []
    for c in crates:
        findings += check_crate(c, show)
    for f in findings:
        print(f)
    if findings:
        sys.exit(1)
    print(f"modules: no circle and no reach into a crate root in {len(crates)} crates")


if __name__ == "__main__":
    main()
