#!/usr/bin/env bash
# One call on a GPU machine: builds each git revision given (a branch, a tag, a commit) from
# this repository side by side, all at once, and sets their GPU time per call next to each
# other and to torch's (benchmarks/gpu_time.py --compare), the first revision as the
# baseline. For trying kernel changes in the few minutes a GPU is lent:
#
#   scripts/gpu_ab.sh main my-candidate other-candidate
#
# Writes build logs and gpu_ab.md to $OUT (default build/gpu-ab/out). Environment as for
# gpu_check.sh (scripts/gpu_env.sh); the compile jobs are shared among the builds. The
# builds that succeed are measured even when another fails; the exit status is then 1.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(($# > 0)) || {
  echo "usage: $0 REVISION..." >&2
  exit 2
}
for rev in "$@"; do
  git -C "$root" rev-parse -q --verify "$rev^{commit}" >/dev/null || {
    echo "$rev: not a revision of $root" >&2
    exit 2
  }
done
out="${OUT:-$root/build/gpu-ab/out}"
mkdir -p "$out"
source "$root/scripts/gpu_env.sh"

jobs=$((MAX_JOBS / $# > 0 ? MAX_JOBS / $# : 1))
trees=()
pids=()
i=0
for rev in "$@"; do
  # Numbered, so that revisions whose names sanitise alike (main~1, main^1) stay apart.
  i=$((i + 1))
  name="$i-$(printf '%s' "$rev" | tr -c 'A-Za-z0-9._-' '_')"
  tree="$root/build/gpu-ab/trees/$name"
  rm -rf "$tree"
  mkdir -p "$tree"
  git -C "$root" archive "$rev" | tar -x -C "$tree"
  trees+=("$tree")
  build_extension "$tree" "$tree/build" "$jobs" >"$out/build-$name.log" 2>&1 &
  pids+=($!)
done
begin=$SECONDS
built=()
status=0
for i in "${!pids[@]}"; do
  log="$out/build-$(basename "${trees[$i]}").log"
  if wait "${pids[$i]}"; then
    built+=("${trees[$i]}")
  else
    echo "build of ${trees[$i]} failed ($log):" >&2
    tail -n 20 "$log" >&2
    status=1
  fi
done
echo "builds: $((SECONDS - begin)) s"
((${#built[@]} > 0)) || exit 1
"$PYTHON" "$root/benchmarks/gpu_time.py" --compare "${built[@]}" | tee "$out/gpu_ab.md" || status=1
exit $status
