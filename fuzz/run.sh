#!/usr/bin/env bash
# The one definition of how the fuzz targets run, for CI and for the long campaign (docs/fuzzing.md).
#
#   fuzz/run.sh build                  build every target with AddressSanitizer and without
#   fuzz/run.sh smoke [SECONDS]        every target for SECONDS (default 8) under ASan, unoptimised: CI's short run
#   fuzz/run.sh campaign N [TARGET…]   N executions per target (default: all targets), one target at a time:
#                                      a tenth (at least 10 million when N ≥ 100 million) under ASan, the
#                                      rest without a sanitizer (2–3 times faster); figures to fuzz/logs/
#   fuzz/run.sh cmin [TARGET…]         merge the campaign's finds into the committed seed corpus (seeds/), minimised
#   fuzz/run.sh targets                list the targets
#
# cargo-fuzz needs `-Z` flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them (no nightly needed).
# Each target runs single-process (no -jobs/-workers): the machines this runs on are small and shared.
# Set NICE (e.g. NICE=15) to run the fuzzers at a lower priority. A crash stops the run with a non-zero
# exit; its input is in fuzz/artifacts/<target>/ (minimise with `cargo fuzz tmin`).
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
# FEATURES=--no-default-features: the decoder targets only, built against `protocol` alone (in their own
# target directories, so the full build's stay valid).
FEATURES=${FEATURES:-}
SUFFIX=${FEATURES:+-decoders}
ASAN_BIN=target/asan$SUFFIX/$TRIPLE/release
NONE_BIN=target/none$SUFFIX/$TRIPLE/release

# The targets that build (those needing the `apps` feature only when it is on).
targets() {
    awk -v apps="${FEATURES:+no}" '
        /^\[\[bin\]\]/ { if (name != "" && !(req && apps == "no")) print name; name = ""; req = 0 }
        /^name = / && in_bin { gsub(/"/, "", $3); name = $3 }
        /^\[\[bin\]\]/ { in_bin = 1 }
        /^required-features/ { req = 1 }
        END { if (name != "" && !(req && apps == "no")) print name }' Cargo.toml
}

# The dictionary of the format a target reads.
dict() {
    case "$1" in
        config_gateway | config_ingest | crm_config | ingest_payload | link_frame) echo "dict/$1.dict" ;;
        *) echo "dict/gatt.dict" ;;
    esac
}

# Per-target libFuzzer flags. link_frame: a link frame is at most 36 bytes on the wire (protocol::link
# MAX_WIRE), so 512 bytes hold a dozen frames and the noise between them; libFuzzer's default 4096 only
# made each run slower.
flags() {
    case "$1" in
        link_frame) echo "-max_len=512" ;;
    esac
}

# Two target directories: the two builds differ in RUSTFLAGS, and sharing one would rebuild every
# dependency each time the other is built.
build_asan() { cargo fuzz build --fuzz-dir . --target-dir "target/asan$SUFFIX" $FEATURES; }
build_none() { cargo fuzz build --fuzz-dir . --target-dir "target/none$SUFFIX" -s none $FEATURES; }
# The smoke's build: ASan without optimisation (`--dev`). It compiles in a fraction of the optimised build's
# time (the whole dependency tree of gateway and ingest, instrumented), and a few seconds per target only
# need the targets to build and to get through their seed corpora, not speed.
SMOKE_BIN=target/asan-dev$SUFFIX/$TRIPLE/debug
build_smoke() { cargo fuzz build --dev --fuzz-dir . --target-dir "target/asan-dev$SUFFIX" $FEATURES; }

# run BIN TARGET WORK_DIR LOG [libFuzzer flags…]: new inputs go to WORK_DIR; seeds/TARGET is read only.
# Regression inputs (regressions/TARGET, if any) are read first, so a fixed crash stays fixed.
run() {
    local bin=$1 target=$2 work=$3 log=$4
    shift 4
    mkdir -p "$work" "artifacts/$target"
    local dirs=("$work" "seeds/$target")
    if [ -d "regressions/$target" ]; then dirs+=("regressions/$target"); fi
    # shellcheck disable=SC2046 # flags is zero or more whole words
    ${NICE:+nice -n "$NICE"} "$bin/$target" "${dirs[@]}" -dict="$(dict "$target")" $(flags "$target") \
        -artifact_prefix="artifacts/$target/" -timeout=10 -print_final_stats=1 "$@" >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        echo "fuzz: $target failed; input in fuzz/artifacts/$target/, log $log" >&2
        return 1
    }
}

# summary TARGET LOG...: executions (summed), the last coverage line of the last log, the corpus size.
summary() {
    local target=$1
    shift
    local execs=0 n
    for log in "$@"; do
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        execs=$((execs + ${n:-0}))
    done
    local last
    last=$(grep -E '^#[0-9]+' "${@: -1}" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' || true)
    printf '%-28s execs %12d  %s  seeds %s files, %s bytes\n' "$target" "$execs" "$last" \
        "$(find "seeds/$target" -type f | wc -l)" "$(find "seeds/$target" -type f -exec cat {} + | wc -c)"
}

case "${1:-}" in
    build)
        build_asan
        build_none
        ;;
    targets) targets ;;
    smoke)
        secs=${2:-8}
        build_smoke
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        for t in $(targets); do
            run "$SMOKE_BIN" "$t" "$tmp/$t" "$tmp/$t.log" -max_total_time="$secs"
            summary "$t" "$tmp/$t.log"
        done
        ;;
    campaign)
        total=${2:?usage: run.sh campaign N [TARGET…]}
        shift 2
        list=("$@")
        if [ ${#list[@]} -eq 0 ]; then mapfile -t list < <(targets); fi
        asan=$((total / 10))
        if [ "$total" -ge 100000000 ] && [ "$asan" -lt 10000000 ]; then asan=10000000; fi
        # MAX_TIME (seconds) caps each run, so a campaign with a deadline still reports how far it got.
        cap=()
        if [ -n "${MAX_TIME:-}" ]; then cap=(-max_total_time="$MAX_TIME"); fi
        mkdir -p logs
        # Every target under ASan first, then the long runs without: a campaign cut short has still put
        # every target through the sanitizer. PHASE=asan or PHASE=none runs one of the two.
        phase=${PHASE:-both}
        if [ "$phase" != none ]; then
            build_asan
            for t in "${list[@]}"; do
                echo "$(date -u +%FT%TZ) $t: $asan executions under ASan" >&2
                run "$ASAN_BIN" "$t" "work/$t" "logs/$t.asan.log" -runs="$asan" "${cap[@]}"
                summary "$t" "logs/$t.asan.log" | tee -a logs/summary.txt
            done
        fi
        if [ "$phase" != asan ]; then
            build_none
            for t in "${list[@]}"; do
                echo "$(date -u +%FT%TZ) $t: $((total - asan)) executions without a sanitizer" >&2
                run "$NONE_BIN" "$t" "work/$t" "logs/$t.none.log" -runs="$((total - asan))" "${cap[@]}"
                # PHASE=none: there may be no ASan log of this campaign to add up.
                logs=()
                for l in "logs/$t.asan.log" "logs/$t.none.log"; do [ -f "$l" ] && logs+=("$l"); done
                summary "$t" "${logs[@]}" | tee -a logs/summary.txt
            done
        fi
        ;;
    cmin)
        shift
        list=("$@")
        if [ ${#list[@]} -eq 0 ]; then mapfile -t list < <(targets); fi
        build_asan
        mkdir -p logs
        for t in "${list[@]}"; do
            new=$(mktemp -d)
            mkdir -p "work/$t" "seeds/$t"
            # -set_cover_merge=1 keeps a small set of inputs that reaches every feature of the others: about
            # half the files of -merge=1 (what `cargo fuzz cmin` runs) on the configuration targets.
            "$ASAN_BIN/$t" -set_cover_merge=1 "$new" "seeds/$t" "work/$t" >"logs/$t.cmin.log" 2>&1
            rm -rf "seeds/$t"
            mv "$new" "seeds/$t"
            echo "$t: $(find "seeds/$t" -type f | wc -l) files, $(find "seeds/$t" -type f -exec cat {} + | wc -c) bytes"
        done
        ;;
    *)
        sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
