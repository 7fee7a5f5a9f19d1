#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (libFuzzer through cargo-fuzz, on the stable toolchain
# with RUSTC_BOOTSTRAP=1): every parser that reads bytes from the network or from a user.
#
#   scripts/fuzz.sh                       every target, 10 million executions each
#   scripts/fuzz.sh --runs 20000 --seed 1 every target briefly and repeatably (CI)
#   scripts/fuzz.sh --time 600 sni_peek   one target for ten minutes
#
# Each target starts from its seeds (fuzz/seeds/TARGET: real ClientHellos from curl,
# openssl and Chromium, real request heads, tokens, frames, PROXY headers, CSRs, the
# example configs) and keeps what it learns in fuzz/corpus/TARGET (not committed).
# Prints one line per target with the executions done; exits non-zero at the first
# crash, whose input libFuzzer saves under fuzz/artifacts/TARGET/.
# Installs cargo-fuzz with `cargo install` if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=10000000
time_limit=""
seed=""
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --time) time_limit="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(sni_peek http_peek token stream_frames proxy_header enroll_bodies config_files)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked >&2
fi

export RUSTC_BOOTSTRAP=1
# Safe Rust: the sanitizer would find nothing the assertions and bounds checks do not,
# and costs most of the speed.
flags=(--sanitizer none -O)
cd fuzz
cargo fuzz build "${flags[@]}" >&2

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    limit=(-runs="$runs")
    [ -n "$time_limit" ] && limit=(-max_total_time="$time_limit")
    [ -n "$seed" ] && limit+=(-seed="$seed")
    log=$(mktemp)
    if ! cargo fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        "${limit[@]}" -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $target FAILED; the input is under fuzz/artifacts/$target/" >&2
        rm -f "$log"
        exit 1
    fi
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    seconds=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log")
    corpus=$(find "corpus/$target" -type f | wc -l)
    echo "fuzz: $target: ${executed:-?} executions in ${seconds:-?} s, no crash; corpus $corpus inputs"
    rm -f "$log"
done
