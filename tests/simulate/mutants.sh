#!/usr/bin/env bash
# Re-introduces historic defects (tests/simulate/mutants/*.patch), one at a time, into this tree, and runs
# the simulator on each of 5 disjoint seed ranges until its first violation: it must find every one within the
# budget, and say which invariant. Prints seeds-to-first-failure (median and max over the ranges).
#   bash tests/simulate/mutants.sh [BUDGET] [RANGES] [NAME]   (default 20000 seeds, 5 ranges, every patch; NAME
#   picks the patches whose file name holds it)
set -euo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-20000} ranges=${2:-5} only=${3:-}
# In place, in the simulator's own build directory (a copy of the tree would build the same crate under the same
# name and fingerprint, and cargo could run one for the other); each patch is reversed before the next, and on exit.
applied=""
trap '[ -z "$applied" ] || git apply -R "$applied"' EXIT
status=0
for patch in tests/simulate/mutants/*.patch; do
    name=$(basename "$patch" .patch)
    [[ "$name" == *"$only"* ]] || continue
    # A patch that no longer applies (the code moved under it) is a failure of the step, not a mutant run unpatched.
    if ! git apply "$patch"; then
        echo "MUTANT DOES NOT APPLY: $name: regenerate $patch against this tree"
        status=1
        continue
    fi
    applied=$patch
    cargo test --profile sim --test simulate --no-run -q 2>&1 | grep -v '^ *Executable' || true
    firsts=() invariants=()
    for r in $(seq 0 $((ranges - 1))); do
        start=$((r * 1000000))
        out=$(cargo test -q --profile sim --test simulate -- --seeds "$start..$((start + budget))" \
            --large 0 --replay-check 0 --no-corpus --first 2>&1 || true)
        line=$(grep '^first failure:' <<<"$out" || true)
        if [ -z "$line" ]; then
            firsts+=("none")
        else
            firsts+=("$(sed -E 's/.*the ([0-9]+)th seed run.*/\1/' <<<"$line")")
            invariants+=("$(sed -E 's/^first failure: seed [0-9]+ \((.*)\), the.*/\1/' <<<"$line")")
            [ "$r" = 0 ] && replay=$(sed -E 's/^first failure: seed ([0-9]+) .*/\1/' <<<"$line")
        fi
    done
    git apply -R "$patch" && applied=""
    if printf '%s\n' "${firsts[@]}" | grep -q none; then
        echo "MUTANT NOT CAUGHT: $name: seeds to first failure per range: ${firsts[*]}"
        status=1
        continue
    fi
    sorted=$(printf '%s\n' "${firsts[@]}" | sort -n)
    median=$(sed -n "$(((ranges + 1) / 2))p" <<<"$sorted") max=$(tail -1 <<<"$sorted")
    inv=$(printf '%s\n' "${invariants[@]}" | sort | uniq -c | sort -rn | head -1 | sed -E 's/^ *[0-9]+ //')
    echo "mutant $name: caught in every range; seeds to first failure ${firsts[*]} (median $median, max $max);" \
         "invariant: $inv; replay: seed ${replay:-?}"
done
exit $status
