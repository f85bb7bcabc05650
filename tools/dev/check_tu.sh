#!/usr/bin/env bash
# Type-checks C++ files (-fsyntax-only) with the flags the build gives their
# folder, without building: a quick loop while editing. A new file takes the
# flags of any file of the same library folder in build/compile_commands.json.
#   tools/dev/check_tu.sh csrc/io/qnat_file.cpp [more files...]
set -euo pipefail
build=${BUILD_DIR:-build}
db="$build/compile_commands.json"
[ -f "$db" ] || { echo "no $db: configure first (cmake -S . -B $build)" >&2; exit 2; }
status=0
for file in "$@"; do
  abs=$(realpath "$file")
  cmd=$(python3 - "$db" "$abs" <<'PY'
import json, os, shlex, sys
db, target = sys.argv[1], sys.argv[2]
entries = json.load(open(db))
def pick():
    for e in entries:
        if os.path.realpath(e["file"]) == target:
            return e
    folder = os.path.dirname(target)
    for e in entries:
        if os.path.dirname(os.path.realpath(e["file"])) == folder and e["file"].endswith(".cpp"):
            return e
    sys.exit(f"no compile command for a file in {folder}")
e = pick()
args = shlex.split(e["command"]) if "command" in e else e["arguments"]
out, skip = [], False
for a in args:
    if skip: skip = False; continue
    if a in ("-o", "-c", "-MF", "-MT", "-MQ"): skip = True; continue
    if a.endswith((".cpp", ".cu")) or a in ("-MD", "-MMD"): continue
    out.append(a)
print(e["directory"]); print(shlex.join(out + ["-fsyntax-only", target]))
PY
)
  dir=$(head -1 <<<"$cmd"); line=$(tail -1 <<<"$cmd")
  echo "== $file"
  (cd "$dir" && eval "$line") || status=1
done
exit $status
