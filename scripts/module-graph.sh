#!/usr/bin/env bash
# Checks that the top-level modules of src/ depend on each other in one direction:
# prints one line per edge ("fs -> config") and fails if the edges form a cycle.
# An edge is any `crate::NAME` path in a module's code (comments are not code, so an
# intra-doc link does not count; say it in words or link from the upper module).
# `lib.rs` and `main.rs` are the crate's roots, not modules, and are left out.
#
# Usage: scripts/module-graph.sh [--quiet] [SRC_DIR]
#   --quiet  print only a cycle, if there is one
# Exits 0 when the graph has no cycle, 1 when it has one, 2 on bad usage.
# docs/ARCHITECTURE.md states the intended direction; the test command runs this.
set -euo pipefail

QUIET=0
SRC=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quiet) QUIET=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "module-graph.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) SRC="$1" ;;
  esac
  shift
done
SRC="${SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/src}"
[[ -d "$SRC" ]] || { echo "module-graph.sh: $SRC is not a directory" >&2; exit 2; }

# The top-level modules: src/NAME.rs and src/NAME/ (mod.rs inside).
modules=()
for entry in "$SRC"/*; do
  name="$(basename "$entry" .rs)"
  case "$name" in lib | main) continue ;; esac
  [[ -d "$entry" || "$entry" == *.rs ]] && modules+=("$name")
done
mapfile -t modules < <(printf '%s\n' "${modules[@]}" | sort -u)

# `use crate::{a, b}` would hide edges from the pattern below: refuse it.
if grep -rnE --include='*.rs' 'crate::\{' "$SRC" >/dev/null; then
  echo "module-graph.sh: grouped crate imports hide edges; write one path per module:" >&2
  grep -rnE --include='*.rs' 'crate::\{' "$SRC" >&2
  exit 1
fi

edges="$(mktemp)"
trap 'rm -f "$edges"' EXIT
for m in "${modules[@]}"; do
  if [[ -d "$SRC/$m" ]]; then files=("$SRC/$m"); else files=("$SRC/$m.rs"); fi
  # Code lines only: drop `//`, `//!` and `///` comments, whole-line or trailing.
  { grep -rhE --include='*.rs' 'crate::[a-z_]+' "${files[@]}" || true; } |
    sed -E 's#^\s*//.*$##; s#\s//.*$##' |
    { grep -oE 'crate::[a-z_]+' || true; } | sed 's/crate:://' | sort -u |
    while read -r dep; do
      [[ "$dep" == "$m" ]] && continue
      printf '%s\n' "${modules[@]}" | grep -qx "$dep" || continue
      echo "$m $dep"
    done
done >"$edges"

if [[ $QUIET -eq 0 ]]; then
  sort "$edges" | awk '{print $1 " -> " $2}'
fi
# tsort orders the graph and names the members of any loop it meets.
if ! out="$(tsort "$edges" 2>&1 >/dev/null)" || [[ -n "$out" ]]; then
  echo "module-graph.sh: the module graph has a cycle:" >&2
  printf '%s\n' "$out" | grep -v 'input contains a loop' | sed 's/^tsort: /  /' >&2
  exit 1
fi
[[ $QUIET -eq 1 ]] || echo "no cycle among ${#modules[@]} top-level modules"
