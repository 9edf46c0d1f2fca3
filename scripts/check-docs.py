#!/usr/bin/env python3
"""`make check-docs`: the docs against the tree, with nothing built (Python's standard library).

Fails, naming each problem, when
- docs/architecture.md has no row for a file under src/: every `.rs` file is a row of its module
  table, a line that starts with its path in backticks (| `src/server/queue.rs` | ...);
- README.md or a page of docs/ names a `src/...` path (in backticks) that does not exist;
- a relative link in README.md or docs/*.md points at a missing file, or at a heading the
  linked page does not have (#anchor, GitHub's way of naming headings);
- `make help` has no line for a target of the Makefile, or names one that does not exist;
- a file under src/ that allows `unsafe` is not named in docs/development.md (its policy).

Usage: scripts/check-docs.py [REPO]  (default: the repository this script is in)
"""

import os
import re
import sys

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
MAP = "docs/architecture.md"
problems = []


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def without_code_blocks(text):
    """The text with fenced code blocks blanked (their lines kept, so line numbers hold)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def doc_pages():
    pages = ["README.md"]
    pages += sorted("docs/" + f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    return pages


# --- the module map --------------------------------------------------------------------------
sources = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, "src"))
    for f in files
    if f.endswith(".rs")
)
arch = read(MAP) if os.path.exists(os.path.join(ROOT, MAP)) else ""
if not arch:
    problems.append(f"{MAP} is missing or empty")
rows = re.findall(r"^\|\s*`(src/[^`]+\.rs)`\s*\|", arch, re.M)
for path in sources:
    if path not in rows:
        problems.append(f"{MAP}: no row for {path} (add a line `| `{path}` | its job | what it imports |`)")
for path in sorted(set(rows)):
    if rows.count(path) > 1:
        problems.append(f"{MAP}: {path} has {rows.count(path)} rows")

# --- src/ paths named anywhere in the docs ----------------------------------------------------
for page in doc_pages():
    for path in sorted(set(re.findall(r"`(src/[A-Za-z0-9_./-]*)`", read(page)))):
        if not os.path.exists(os.path.join(ROOT, path)):
            problems.append(f"{page}: names {path}, which does not exist (a file removed or renamed?)")


# --- links ------------------------------------------------------------------------------------
def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(rel):
    seen, out = {}, set()
    for line in without_code_blocks(read(rel)).split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


links = 0
for page in doc_pages():
    text = without_code_blocks(read(page))
    for number, line in enumerate(text.split("\n"), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, file:
                continue
            links += 1
            path, _, anchor = target.partition("#")
            rel = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, rel)):
                problems.append(f"{page}:{number}: link to {target}: {rel} does not exist")
            elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
                problems.append(f"{page}:{number}: link to {target}: {rel} has no heading #{anchor}")

# --- make help --------------------------------------------------------------------------------
makefile = read("Makefile")
phony = set()
for m in re.finditer(r"^\.PHONY:(.*)$", makefile, re.M):
    phony.update(m.group(1).split())
rules = set(re.findall(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:(?!=)", makefile, re.M))
help_recipe = re.search(r"^help:\n((?:\t.*\n)+)", makefile, re.M)
helped = re.findall(r'^\t@echo "make ([A-Za-z0-9_-]+)', help_recipe.group(1) if help_recipe else "", re.M)
for target in sorted(rules - phony):
    problems.append(f"Makefile: target {target} is not in .PHONY")
for target in sorted((phony | rules) - set(helped)):
    problems.append(f"Makefile: make help has no line for {target}")
for target in sorted(set(helped) - rules):
    problems.append(f"Makefile: make help names {target}, which is not a target")
for target in sorted(set(t for t in helped if helped.count(t) > 1)):
    problems.append(f"Makefile: make help lists {target} more than once")

# --- the unsafe policy ------------------------------------------------------------------------
policy = read("docs/development.md") if os.path.exists(os.path.join(ROOT, "docs/development.md")) else ""
for path in sources:
    if "allow(unsafe_code)" in read(path):
        # Named itself, or its folder as a whole (`src/kernels/simd/`).
        if f"`{path}`" not in policy and f"`{os.path.dirname(path)}/`" not in policy:
            problems.append(f"docs/development.md: {path} allows unsafe code but the unsafe policy does not name it")

if problems:
    for p in problems:
        print(f"check-docs: {p}", file=sys.stderr)
    print(f"check-docs: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"check-docs: {len(sources)} source files mapped, {links} links resolve, {len(helped)} targets in make help: ok")
