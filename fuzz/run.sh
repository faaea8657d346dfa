#!/usr/bin/env bash
# Runs every fuzz target (cargo-fuzz, libFuzzer) from the committed seeds.
#   bash fuzz/run.sh            # 1,000,000 inputs per target (or 20 min)
#   bash fuzz/run.sh --short    # 10 s per target: what CI runs
# Needs a nightly toolchain; cargo-fuzz is installed into target/tools when
# missing. New inputs collect in target/fuzz-corpus/<target>; a crash is
# written to fuzz/artifacts/<target>/ and stops the run with status 1 —
# minimize it (cargo fuzz tmin), fix the cause, and commit the input under
# fuzz/regressions/<target>/ (the workspace tests replay it).
set -euo pipefail
cd "$(dirname "$0")/.."
short=0
[[ "${1:-}" == "--short" ]] && short=1
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: skipped — no nightly toolchain here (cargo-fuzz needs one: rustup toolchain install nightly)"
    exit 0
fi
export PATH="$PWD/target/tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --root target/tools
fi
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^talon-fuzz$')
# The short run builds unoptimized (minutes less to build on a fresh
# machine, fewer inputs a second); the full run optimized.
if [[ $short == 1 ]]; then
    (cd fuzz && cargo +nightly fuzz build --dev -s none --target-dir ../target/fuzz)
    bin=target/fuzz/x86_64-unknown-linux-gnu/debug
else
    (cd fuzz && cargo +nightly fuzz build -s none --target-dir ../target/fuzz)
    bin=target/fuzz/x86_64-unknown-linux-gnu/release
fi
for t in $targets; do
    mkdir -p "target/fuzz-corpus/$t" "fuzz/artifacts/$t"
    if [[ $short == 1 ]]; then
        limits=(-max_total_time=10)
    else
        limits=(-runs=1000000 -max_total_time=1200)
    fi
    echo "fuzz: $t"
    log="target/fuzz-corpus/$t.log"
    status=0
    "$bin/$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${limits[@]}" >"$log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY)|panicked" "$log" || true
    if [[ $status -ne 0 ]]; then
        echo "fuzz: $t FAILED (status $status); the input is in fuzz/artifacts/$t/, the log in $log"
        exit 1
    fi
done
