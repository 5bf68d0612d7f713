#!/usr/bin/env bash
# Builds and runs every fuzz target for a bounded time.
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; TARGET defaults to all of them
# (`cargo fuzz list`). Runs from any directory. Uses the nightly toolchain
# if rustup has one, else the default (stable) toolchain with
# RUSTC_BOOTSTRAP=1; FUZZ_TOOLCHAIN=name forces a rustup toolchain.
# Installs cargo-fuzz if it is missing.
#
# Each target starts from its committed seeds (corpus/<target>/seed-*) and
# the corpus earlier runs grew (.work/corpus/<target>/, ignored by git;
# delete it to start over). Exits non-zero if any target crashed, panicked,
# leaked or timed out, after printing the reproducer's path and bytes
# (rerun it with the command printed below it). Logs: .work/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

# Toolchain: nightly if present, else stable with RUSTC_BOOTSTRAP=1 (cargo
# fuzz needs -Z flags).
cargo=(cargo)
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    cargo=(cargo "+$FUZZ_TOOLCHAIN")
elif command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
    cargo=(cargo +nightly)
fi
if ! "${cargo[@]}" --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
echo "toolchain: $("${cargo[@]}" --version)${RUSTC_BOOTSTRAP:+ (RUSTC_BOOTSTRAP=1)}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# --no-cfg-fuzzing: under cfg(fuzzing) smoltcp's verify_checksum() always
# says yes, so classify() would take frames it rejects in production.
flags=(--fuzz-dir . --no-cfg-fuzzing)

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <("${cargo[@]}" fuzz list "${flags[@]:0:2}")
fi

start=$(date +%s)
if [ $# -gt 0 ]; then
    for t in "${targets[@]}"; do "${cargo[@]}" fuzz build "${flags[@]}" "$t"; done
else
    "${cargo[@]}" fuzz build "${flags[@]}"
fi
echo "built in $(($(date +%s) - start)) s"

mkdir -p .work/logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p ".work/corpus/$t" "artifacts/$t"
    log=".work/logs/$t.log"
    echo "== $t: ${secs} s"
    dirs=(".work/corpus/$t")
    [ -d "corpus/$t" ] && dirs+=("corpus/$t")
    extra=()
    [ -f "dict/$t.dict" ] && extra+=("-dict=dict/$t.dict")
    # -timeout: one input running 10 s is a hang, reported like a crash.
    if "${cargo[@]}" fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
        grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
    else
        failed+=("$t")
        echo "!! $t FAILED (log: tests/fuzz/$log)"
        grep -m 1 -A 2 "panicked at" "$log" ||
            grep -E -m 3 "^==[0-9]+== ERROR|SUMMARY|^Error" "$log" || tail -n 20 "$log"
        while read -r f; do
            [ -f "$f" ] || continue
            echo "reproducer: tests/fuzz/${f#./}"
            od -A x -t x1z -v "$f" | head -n 20
            echo "rerun (in tests/fuzz): ${cargo[*]} fuzz run ${flags[*]} $t ${f#./}"
        done < <(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
    fi
done

echo "total $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
echo "no crashes in: ${targets[*]}"
