#!/usr/bin/env bash
# One call on a GPU machine: builds each version given side by side, all at once, and sets
# their GPU time per call next to each other and to torch's (benchmarks/gpu_time.py
# --compare), the first as the baseline. A version is a git revision of this repository
# with patch files of the working tree, if any, applied on top: REV[+PATCH...]. Only the
# checked-out commit can be relied on to exist on a GPU machine (a copy of the working tree
# need not carry other branches), so candidates travel as patches:
#
#   scripts/gpu_ab.sh HEAD HEAD+candidates/a.patch HEAD+candidates/a.patch+candidates/b.patch
#
# The versions build at once, sharing the cores; each then measures in about 15 s. Writes
# build logs, gpu_ab.json (after each version is measured), gpu_ab.md and gpu_ab-kernels.md
# (the costliest kernels of each case) to $OUT (default build/gpu-ab/out). Environment as
# for gpu_check.sh (scripts/gpu_env.sh); the compile jobs are shared among the builds. The
# builds that succeed are measured even when another fails; the exit status is then 1.
#
# A version written ref:REV[+PATCH...] is measured for comparison only, never chosen as the
# best (say, main with a landed change reverted, to measure what the change costs).
#
# build/gpu-ab/best (and $OUT/gpu_ab-best.txt) names the tree of the fastest version whose
# results are right (gpu_time.py --best), built in its build/; a next call on the same
# machine checks it without building it again:
#
#   tree=$(cat build/gpu-ab/best) && TBN_BUILD_DIR=$tree/build "$tree/scripts/gpu_check.sh"
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(($# > 0)) || {
  echo "usage: $0 REVISION..." >&2
  exit 2
}
for version in "$@"; do
  IFS=+ read -r rev patches <<<"${version#ref:}"
  git -C "$root" rev-parse -q --verify "$rev^{commit}" >/dev/null || {
    echo "$rev: not a revision of $root" >&2
    exit 2
  }
  for patch in ${patches//+/ }; do
    [ -f "$root/$patch" ] || {
      echo "$patch: no such patch file in $root" >&2
      exit 2
    }
  done
done
out="${OUT:-$root/build/gpu-ab/out}"
mkdir -p "$out" "$root/build/gpu-ab"
rm -f "$root/build/gpu-ab/best"
source "$root/scripts/gpu_env.sh"

jobs=$((MAX_JOBS / $# > 0 ? MAX_JOBS / $# : 1))
trees=()
references=()
pids=()
i=0
for version in "$@"; do
  IFS=+ read -r rev patches <<<"${version#ref:}"
  # Numbered, so that versions whose names sanitise alike (main~1, main^1) stay apart.
  i=$((i + 1))
  name="$i-$rev"
  [ "$version" = "${version#ref:}" ] || name="$i-ref-$rev"
  for patch in ${patches//+/ }; do
    name+="+$(basename "$patch" .patch)"
  done
  name="$(printf '%s' "$name" | tr -c 'A-Za-z0-9._+-' '_')"
  tree="$root/build/gpu-ab/trees/$name"
  rm -rf "$tree"
  mkdir -p "$tree"
  git -C "$root" archive "$rev" | tar -x -C "$tree" || exit 1
  for patch in ${patches//+/ }; do
    git -C "$root" apply --directory="build/gpu-ab/trees/$name" "$root/$patch" || {
      echo "$version: $patch does not apply to $rev" >&2
      exit 1
    }
  done
  trees+=("$tree")
  [ "$version" = "${version#ref:}" ] || references+=(--not-best "$tree")
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
"$PYTHON" "$root/benchmarks/gpu_time.py" --compare "${built[@]}" --json "$out/gpu_ab.json" \
  --kernels "$out/gpu_ab-kernels.md" --best "$root/build/gpu-ab/best" "${references[@]}" |
  tee "$out/gpu_ab.md" || status=1
cp "$root/build/gpu-ab/best" "$out/gpu_ab-best.txt" 2>/dev/null
exit $status
