#!/usr/bin/env python3
"""Check the relative links of README.md and docs/*.md.

For every Markdown link `[text](target)` outside code (fenced blocks and inline code spans),
except http(s):// and mailto: targets, the target's file must exist relative to the linking
file, and a `#anchor` must be the GitHub slug of a heading in the target Markdown file (or in
the linking file itself for `#anchor` alone). Prints `file:line: target` for each broken link
and exits 1, or prints one OK line with the number of links checked.

    python3 scripts/check-links.py

Standard library only; it may be run from anywhere (paths are taken from the repository root,
the parent of this script's directory).
"""

import os
import re
import sys
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
NOT_SETEXT_TEXT = re.compile(r"^\s*([-*+|>]|\d+[.)])")  # list items, tables, quotes
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); the text may hold one level of brackets and may
# run over a line break
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SKIP = ("http://", "https://", "mailto:")


def files_to_check():
    files = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    if os.path.isdir(docs):
        files += sorted(
            os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md")
        )
    return [f for f in files if os.path.isfile(f)]


def prose_lines(text):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.split("\n"), start=1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
            else:
                yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and line.strip() == m.group(1):
            fence = None


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags go
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    """The slugs of every heading in a Markdown file, repeats numbered as GitHub does."""
    if path not in _anchors:
        with open(path, encoding="utf-8") as f:
            lines = list(prose_lines(f.read()))
        seen, found = {}, set()
        previous = None  # (number, text) of the line before, if it could be a setext heading
        for number, line in lines:
            atx = ATX.match(line)
            heading = None
            if atx:
                heading = atx.group(2) or ""
            elif SETEXT.match(line) and previous and previous[0] == number - 1:
                heading = previous[1]
            if heading is not None:
                base = slug(heading)
                count = seen.get(base, 0)
                seen[base] = count + 1
                found.add(base if count == 0 else f"{base}-{count}")
                previous = None
            elif line.strip() and not NOT_SETEXT_TEXT.match(line):
                previous = (number, line.strip())
            else:
                previous = None
        _anchors[path] = found
    return _anchors[path]


def check(path):
    """(number of links checked, [(line, target)] of the broken ones)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # the prose with its line numbers kept: code blocks blanked, code spans neutralised
    lines = [""] * (text.count("\n") + 1)
    for number, line in prose_lines(text):
        lines[number - 1] = CODE_SPAN.sub("code", line)
    prose = "\n".join(lines)
    checked, broken = 0, []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if not target or target.lower().startswith(SKIP):
            continue
        checked += 1
        number = prose.count("\n", 0, m.start(1)) + 1
        file_part, _, anchor = target.partition("#")
        file_part = urllib.parse.unquote(file_part)
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(linked):
            broken.append((number, target))
        elif anchor and linked.endswith(".md") and os.path.isfile(linked) \
                and urllib.parse.unquote(anchor) not in anchors(linked):
            broken.append((number, target))
    return checked, broken


def main():
    total, failures = 0, []
    files = files_to_check()
    for path in files:
        checked, broken = check(path)
        total += checked
        name = os.path.relpath(path, ROOT)
        failures += [f"{name}:{line}: {target}" for line, target in broken]
    if failures:
        print("\n".join(failures))
        print(f"{len(failures)} broken of {total} links checked in {len(files)} files")
        return 1
    print(f"OK: {total} links checked in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
