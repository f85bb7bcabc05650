#!/usr/bin/env python3
"""Rewrites our private includes in csrc/ to one style: the path from csrc/
("cpu/isa_kernels.h"), never relative to the including file or with "../".
  tools/dev/normalize_includes.py [files...]   (default: every file in csrc/)"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
INCLUDE = re.compile(r'^(\s*#\s*include\s+")([^"]+)(")', re.M)


def fix(path):
    text = path.read_text()

    def rewrite(m):
        inc = m.group(2)
        if inc.startswith("qlora/"):
            return m.group(0)
        local = (path.parent / inc).resolve()
        if local.is_file() and CSRC in local.parents:
            inc = local.relative_to(CSRC).as_posix()
        return m.group(1) + inc + m.group(3)

    new = INCLUDE.sub(rewrite, text)
    if new != text:
        path.write_text(new)
        print("rewrote", path.relative_to(ROOT))


files = [pathlib.Path(f).resolve() for f in sys.argv[1:]] or [
    p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")]
for f in files:
    fix(f)
