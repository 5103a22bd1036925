#!/usr/bin/env python3
"""Which top-level modules of src/ refer to which (`crate::NAME`, also inside
`use crate::{...}` groups), and every cycle among them. Tests (`#[cfg(test)]`
modules) count too. Exit 1 when there is a cycle.

    scripts/module-deps.py          # cycles only
    scripts/module-deps.py -v       # every edge
"""
import os, re, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

def top_module(path):
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first

def references(text):
    out = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
    for group in re.findall(r"\buse\s+crate::\{(.*?)\};", text, re.S):
        depth = 0
        token = ""
        for ch in group + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if depth == 0 and ch == ",":
                name = token.strip().split("::")[0].split(" ")[0].strip("{} \n")
                if name:
                    out.add(name)
                token = ""
            elif depth == 0:
                token += ch
    return out

edges = {}
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        src = top_module(path)
        if src in ("lib", "main"):
            continue
        text = open(path).read()
        for dst in references(text):
            if dst != src and dst not in ("self", "super"):
                edges.setdefault(src, set()).add(dst)

modules = sorted(set(edges) | {d for ds in edges.values() for d in ds})
if "-v" in sys.argv:
    for m in modules:
        print(f"{m} -> {', '.join(sorted(edges.get(m, ())))}")

# Strongly connected components (Tarjan).
index, low, stack, on, comps = {}, {}, [], set(), []
counter = [0]
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            comps.append(sorted(comp))
sys.setrecursionlimit(10000)
for m in modules:
    if m not in index:
        visit(m)
if comps:
    for c in comps:
        print("cycle among:", ", ".join(c))
    sys.exit(1)
print(f"no cycle among {len(modules)} top-level modules")
