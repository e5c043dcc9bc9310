#!/usr/bin/env bash
# Writes packaging/gateway/hot-functions.txt: every function the gateway executes in a run with simulated
# devices, as packaging/order-text.sh reads them (demangled, no crate hashes, sorted). Rerun it when the
# code a running gateway uses has moved a lot (order-text.sh prints how many functions it found).
#
#   packaging/hot-functions.sh [SECONDS]      # default 150; needs valgrind and mosquitto
#   (HOT_FUNCTIONS_TARGET_DIR: where its unstripped build goes, default target/hot-functions)
#
# The run: the packaged build (`dist`, no embedded broker) with its symbols, under callgrind (which sees
# every function called, not a sample), the unit's environment, a local Mosquitto, 5 glucometers and
# 5 two-user cuffs with 300 stored records each (a catch-up) measuring every second, edge alerts on: the
# bench's devices (tests/benches/gateway_memory.rs). Not in it: the Bluetooth path (btleplug, D-Bus),
# the kiosk and TLS; their code stays where the linker puts it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-150}
command -v valgrind >/dev/null || { echo "hot-functions.sh: needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
command -v mosquitto >/dev/null || { echo "hot-functions.sh: needs mosquitto" >&2; exit 1; }

dir=$(realpath -m "${HOT_FUNCTIONS_TARGET_DIR:-target/hot-functions}")
CARGO_PROFILE_DIST_STRIP=false cargo build --profile dist -p gateway --no-default-features --target-dir "$dir"
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$work"' EXIT

{
  printf 'gateway_id = "gw-hot"\n\n[mqtt]\nbroker = "mqtt://127.0.0.1:%s"\n\n[journal]\ndir = "%s/journal"\n\n' "$port" "$work"
  for i in 0 1 2 3 4; do
    printf '[[simulated]]\nkind = "glucometer"\nid = "meter-%s"\nstored = 300\nmeasure_every_s = 1\nconnect_every_s = 5\n\n' "$i"
    printf '[[bindings]]\ndevice = "meter-%s"\npatient = "p-hot-g%s"\n\n' "$i" "$i"
    printf '[[simulated]]\nkind = "cuff"\nid = "cuff-%s"\nstored = 300\nusers = [1, 2]\nmeasure_every_s = 1\nconnect_every_s = 5\n\n' "$i"
    for u in 1 2; do
      printf '[[bindings]]\ndevice = "cuff-%s"\nuser_id = %s\npatient = "p-hot-c%s-%s"\n\n' "$i" "$u" "$i" "$u"
    done
  done
} >"$work/gateway.toml"

# The unit's Environment= (MALLOC_ARENA_MAX), as the bench and the Pi run it.
read -ra unit_env <<<"$(sed -n 's/^Environment=//p' packaging/gateway/phg-gateway.service | tr '\n' ' ')"
(cd "$work" && env "${unit_env[@]}" timeout -s INT "$seconds" valgrind --tool=callgrind --demangle=no \
  --callgrind-out-file="$work/callgrind.out" "$dir/dist/gateway" run --config gateway.toml \
  >"$work/gateway.log" 2>&1) || true
grep -q "stopped accepted=" "$work/gateway.log" || { cat "$work/gateway.log" >&2; exit 1; }
grep -oE '^c?fn=\([0-9]+\) .+' "$work/callgrind.out" | sed -E 's/^c?fn=\([0-9]+\) //' | grep -E '^(_ZN|_R)' \
  | packaging/order-text.sh --names | LC_ALL=C sort -u >packaging/gateway/hot-functions.txt
echo "hot-functions: $(wc -l <packaging/gateway/hot-functions.txt) names; $(grep -o 'stopped accepted=[0-9]*' "$work/gateway.log")"
