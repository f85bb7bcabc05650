"""The folder layering of docs/ARCHITECTURE.md, checked on the includes.

Every #include "..." of our own in csrc/<folder>/ and include/qlora/<folder>/ must name a
folder that <folder> may depend on. The ops library's folders (libqlora_ops) may use one
another but nothing of libqlora; file formats (io/) know no models. Run with the repository
root as the argument (ctest does); prints every violation and exits 1 if there is one.
"""
import pathlib
import re
import sys

OPS = {"ops", "common", "cpu", "cuda", "meta", "autograd"}
# folder -> the folders (besides itself) it may include from.
ALLOWED = {f: OPS for f in OPS}
ALLOWED.update({
    "util": OPS,
    "io": OPS | {"util"},
    "nn": OPS | {"util", "io"},
    "tokenizers": OPS | {"util", "io"},
    "models": OPS | {"util", "io", "nn"},
    "data": OPS | {"util", "io", "tokenizers"},
    "optim": OPS | {"util"},
    "dist": OPS | {"util"},
    "export": OPS | {"util", "io", "nn", "models", "tokenizers"},
    "train": OPS | {"util", "io", "nn", "models", "tokenizers", "data", "optim", "export", "dist"},
})
# Top-level public headers belong to the ops library.
TOP_LEVEL_OPS_HEADERS = {"ops.h", "quant_state.h", "code_tables.h", "cpu_capability.h"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def folder_of_include(path):
    parts = pathlib.PurePosixPath(path).parts
    if parts[0] == "qlora":
        if len(parts) == 2:
            return "ops" if parts[1] in TOP_LEVEL_OPS_HEADERS else None
        return parts[1]
    return parts[0] if len(parts) > 1 else None


def main(root):
    root = pathlib.Path(root)
    problems = []
    sources = [(p, p.relative_to(root / "csrc").parts[0]) for p in (root / "csrc").rglob("*")
               if p.suffix in {".h", ".cpp", ".cu", ".cuh"} and len(p.relative_to(root / "csrc").parts) > 1]
    sources += [(p, p.relative_to(root / "include/qlora").parts[0]) for p in (root / "include/qlora").rglob("*.h")
                if len(p.relative_to(root / "include/qlora").parts) > 1]
    sources += [(root / "include/qlora" / h, "ops") for h in TOP_LEVEL_OPS_HEADERS]
    for path, folder in sources:
        if folder not in ALLOWED:
            problems.append(f"{path.relative_to(root)}: folder '{folder}' is not in the layering table")
            continue
        for inc in INCLUDE.findall(path.read_text()):
            if "/" not in inc:
                problems.append(f"{path.relative_to(root)}: include \"{inc}\" by its path from csrc/")
                continue
            if inc.startswith("../"):
                problems.append(f"{path.relative_to(root)}: include \"{inc}\" without ../")
                continue
            dep = folder_of_include(inc)
            if dep is None or dep == folder:
                continue
            if dep not in ALLOWED[folder]:
                problems.append(f"{path.relative_to(root)}: {folder}/ may not include {inc} ({dep}/)")
    for p in problems:
        print(p)
    print(f"checked {len(sources)} files: {len(problems)} layering problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
