#!/usr/bin/env bash
# Coverage-guided fuzzing of layerboot-init and of the builder's reading of the ESP
# (cargo-fuzz + libFuzzer, crate in fuzz/).
#
#   bash bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s, every target)
#
# Builds every target once, runs each for SECONDS_PER_TARGET, then prints one Markdown
# table. Exits 1 if any target found a crash, timeout, OOM or leak in this run.
# Environment:
#   FUZZ_JOBS       targets fuzzed at once (default 2: one per core of the usual runner)
#   FUZZ_SANITIZER  address (default) or none, passed to `cargo fuzz build --sanitizer`
#   FUZZ_TIMEOUT    seconds one input may take before libFuzzer reports a hang (default 10)
# Everything it writes is under target/: fuzz-build/ (binaries), fuzz-corpus/<t>/ (the
# corpus, kept between runs so campaigns add up), fuzz-artifacts/<t>/ (crash-*, timeout-*,
# oom-*, leak-* inputs), fuzz-logs/<t>.log (libFuzzer's output).
set -euo pipefail

cd "$(dirname "$0")/.."

secs=${1:-600}
[[ $# -gt 0 ]] && shift
jobs=${FUZZ_JOBS:-2}
sanitizer=${FUZZ_SANITIZER:-address}
per_input_timeout=${FUZZ_TIMEOUT:-10}
# The workspace's .cargo/config.toml builds for musl, which has no sanitizers.
triple=x86_64-unknown-linux-gnu
build_dir=target/fuzz-build
bin_dir=$build_dir/$triple/release
# Only a stable toolchain here: cargo-fuzz's -Z flags need the bootstrap escape hatch.
export RUSTC_BOOTSTRAP=1

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        t=${f##*/}
        targets+=("${t%.rs}")
    done
fi

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

mkdir -p target/fuzz-logs
# One build for all targets; running the binaries directly (not `cargo fuzz run`) keeps
# corpora and artifacts under target/ instead of fuzz/.
cargo fuzz build --target "$triple" --target-dir "$build_dir" --sanitizer "$sanitizer"

# Artifacts older than this run are earlier findings, not this run's.
stamp=target/fuzz-logs/.run-start
touch "$stamp"

# Inputs must be long enough for the format: a bbolt file needs 3+ pages, a GPT with
# 4096-byte sectors 12 KiB; libFuzzer's default (4096) would cut the seeds short.
max_len() {
    case $1 in
        bolt | probe) echo 16384 ;;
        store_json) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

run_one() {
    local t=$1 corpus=target/fuzz-corpus/$1 artifacts=target/fuzz-artifacts/$1
    local log=target/fuzz-logs/$1.log
    local -a args=("-max_total_time=$secs" "-timeout=$per_input_timeout" "-max_len=$(max_len "$t")"
        "-artifact_prefix=$artifacts/" "-print_final_stats=1")
    [[ -f fuzz/dicts/$t.dict ]] && args+=("-dict=fuzz/dicts/$t.dict")
    mkdir -p "$corpus" "$artifacts"
    # The first corpus dir takes new inputs; fuzz/seeds/<t> is only read.
    local -a dirs=("$corpus")
    [[ -d fuzz/seeds/$t ]] && dirs+=("fuzz/seeds/$t")
    local start=$SECONDS
    # A finding makes libFuzzer exit non-zero; the table reports it, so carry on.
    "$bin_dir/$t" "${args[@]}" "${dirs[@]}" >"$log" 2>&1 || true
    echo $((SECONDS - start)) >"target/fuzz-logs/$t.seconds"
}

running=0
for t in "${targets[@]}"; do
    if [[ ! -x $bin_dir/$t ]]; then
        echo "fuzz.sh: no target '$t' (built: $(ls fuzz/fuzz_targets))" >&2
        exit 2
    fi
    if ((running >= jobs)); then
        wait -n || true
        running=$((running - 1))
    fi
    echo "fuzzing $t for ${secs}s (log: target/fuzz-logs/$t.log)" >&2
    run_one "$t" &
    running=$((running + 1))
done
wait

found=0
echo
echo "| target | seconds | runs | exec/s | coverage (cov) | features (ft) | corpus files | crashes |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for t in "${targets[@]}"; do
    log=target/fuzz-logs/$t.log
    elapsed=$(cat "target/fuzz-logs/$t.seconds")
    # "Done N runs" only when the time ran out; after a crash the final stats still say.
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n1)
    [[ -n $runs ]] || runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\)/\1/p' "$log" | tail -n1)
    execs=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\)/\1/p' "$log" | tail -n1)
    last=$(grep -E '^#[0-9]+.* cov: [0-9]+ ft: [0-9]+' "$log" | tail -n1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    files=$(find "target/fuzz-corpus/$t" -type f | wc -l)
    crashes=$(find "target/fuzz-artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) -newer "$stamp" | wc -l)
    ((crashes == 0)) || found=1
    echo "| $t | $elapsed | ${runs:-?} | ${execs:-?} | ${cov:-?} | ${ft:-?} | $files | $crashes |"
done

if ((found)); then
    echo
    echo "Findings (inputs in target/fuzz-artifacts/<target>/; reproduce: $bin_dir/<target> <file>):"
    find target/fuzz-artifacts -type f -newer "$stamp" | sort
    exit 1
fi
