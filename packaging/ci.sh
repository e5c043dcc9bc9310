#!/usr/bin/env bash
# Packaging CI (docs/install.md; .ci/run calls it): builds the four packages (amd64 natively, arm64
# cross-built with the linker in .cargo/config.toml), runs lintian on them (errors fail), checks the units
# offline, installs the amd64 gateway package with dpkg, checks the user, the owners and modes and the
# installed unit, runs the installed binary as user phg with the packaged configuration pointed at a local
# Mosquitto and checks that a reading arrives, purges the package and checks that nothing is left, and
# runs the arm64 binaries under qemu-aarch64-static. Prints the figures: package and binary sizes,
# exposure scores.
#
# systemd is not PID 1 in CI (a container): the unit cannot be started. The installed binary is run the way
# the unit's ExecStart= runs it — as user phg, no new privileges, the state directory as StateDirectory=
# makes it (/var/lib/phg, 0750 phg:phg) — with setpriv. The unit itself is checked offline
# (systemd-analyze verify, security --offline=true).
#
# Needs root (dpkg -i), cargo-deb, lintian, mosquitto, mosquitto-clients, qemu-user-static and the arm64
# cross toolchain (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
ARM=aarch64-unknown-linux-gnu
step() { printf '\n=== %s\n' "$*"; }
fail() { echo "packaging/ci.sh: FAIL: $*" >&2; exit 1; }

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked

step "build the packages"
# One build of both programs per architecture (their dependencies built once, not once per package), as
# the packages ship them: no embedded broker. The arm64 one (the Raspberry Pi's) uses the `dist` profile,
# smaller at the cost of a longer build (docs/raspberry-pi.md: 9.7 MB instead of 14.2), and is .ci/run's
# Pi build, reused. The amd64 packages (a CRM host, a test machine) keep `release`: size matters little
# there, and CI's time does.
# AMD64_PROFILE: the amd64 build's profile (default release). AMD64_PREBUILT=1: the amd64 binaries are
# already in place and are packaged as they are. .ci/run sets `dev` and AMD64_PREBUILT=1: it packages the
# binaries its tests just ran (the test build's, with the demo's embedded broker and unordered), because
# what it checks of the amd64 packages — their files, units, user, install, a reading through the installed
# binary, purge — does not depend on how the binary was optimised, and a `release` build of both programs
# cost CI 1 010 s of CPU of the 2 × 1 800 its 30 minutes have. The build CI checks as it ships is the arm64
# one, a Raspberry Pi's.
# AMD64_TARGET_DIR: where the amd64 build is (default target/).
amd64_dir=${AMD64_TARGET_DIR:-target}
amd64_profile=${AMD64_PROFILE:-release}
amd64_out=$amd64_dir/$amd64_profile
if [ "$amd64_profile" = dev ]; then amd64_out=$amd64_dir/debug; fi
# ingest by cargo build; the gateway by packaging/order-text.sh, which builds it with the code a running
# gateway uses first in .text (less of it resident: docs/performance.md). Not both in one `cargo build`:
# that unifies the two programs' dependency features, so order-text's `cargo rustc -p gateway` (the
# gateway's features alone) rebuilt the gateway library and the dependencies whose features differ, and
# the gateway was linked three times (fat LTO on arm64: minutes each) where two serve. Seconds when .ci/run
# did it already.
if [ -z "${AMD64_PREBUILT:-}" ]; then
  CARGO_TARGET_DIR=$amd64_dir cargo build --profile "$amd64_profile" -p ingest --no-default-features
  CARGO_TARGET_DIR=$amd64_dir packaging/order-text.sh "$amd64_profile"
fi
cargo build --profile dist -p ingest --no-default-features --target "$ARM"
packaging/order-text.sh dist "$ARM"
CARGO_TARGET_DIR=$amd64_dir cargo deb -p gateway --profile "$amd64_profile" --no-build
CARGO_TARGET_DIR=$amd64_dir cargo deb -p ingest --profile "$amd64_profile" --no-build
cargo deb -p gateway --target "$ARM" --profile dist --no-build
cargo deb -p ingest --target "$ARM" --profile dist --no-build
version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="gateway"))')
gw_amd64=$amd64_dir/debian/phg-gateway_${version}-1_amd64.deb
in_amd64=$amd64_dir/debian/phg-ingest_${version}-1_amd64.deb
gw_arm64=target/$ARM/debian/phg-gateway_${version}-1_arm64.deb
in_arm64=target/$ARM/debian/phg-ingest_${version}-1_arm64.deb
for deb in "$gw_amd64" "$in_amd64" "$gw_arm64" "$in_arm64"; do
  [ -f "$deb" ] || fail "no $deb"
done

step "lintian (errors fail; warnings and infos are printed)"
lintian --fail-on error --tag-display-limit 0 "$gw_amd64" "$in_amd64" "$gw_arm64" "$in_arm64" || fail "lintian"

step "units, offline"
# ExecStart pointed at the amd64 build (verify wants the binary; nothing is installed yet).
export PHG_BIN_DIR
PHG_BIN_DIR=$(realpath "$amd64_out")
packaging/check-units.sh

step "dpkg -i $gw_amd64"
$SUDO dpkg -i "$gw_amd64"
getent passwd phg >/dev/null || fail "no user phg"
[ "$(getent passwd phg | cut -d: -f7)" = /usr/sbin/nologin ] || fail "phg has a login shell"
if getent group bluetooth >/dev/null; then
  id -nG phg | tr ' ' '\n' | grep -qx bluetooth || fail "phg is not in group bluetooth"
fi
expect_stat() { # path owner:group mode
  got=$(stat -c '%U:%G %a' "$1")
  [ "$got" = "$2 $3" ] || fail "$1 is $got, expected $2 $3"
  echo "ok: $1 $got"
}
expect_stat /etc/phg/gateway.toml root:phg 640
expect_stat /usr/bin/phg-gateway root:root 755
expect_stat /usr/lib/systemd/system/phg-gateway.service root:root 644
grep -qx /etc/phg/gateway.toml /var/lib/dpkg/info/phg-gateway.conffiles || fail "gateway.toml is not a conffile"
/usr/bin/phg-gateway check -c /etc/phg/gateway.toml
packaging/check-units.sh --installed

step "run the installed binary as user phg (the unit's ExecStart; systemd is not PID 1 here)"
work=$(mktemp -d)
mosquitto_pid="" gateway_pid=""
cleanup() {
  [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null || true
  [ -n "$mosquitto_pid" ] && kill "$mosquitto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
mosquitto_pid=$!
# Listening before the subscriber connects: on a loaded CI machine Mosquitto took longer to start than
# the subscriber, which then failed with "Connection refused" and no retry.
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
# What StateDirectory=phg + StateDirectoryMode=0750 would make.
$SUDO install -d -o phg -g phg -m 0750 /var/lib/phg
# The packaged configuration, pointed at this broker, without the radio (no adapter here), with a
# simulated meter bound to a patient.
chmod 755 "$work"
sed -e "s|^broker = .*|broker = \"mqtt://127.0.0.1:$port\"|" -e '/^\[ble\]/,/^$/d' /etc/phg/gateway.toml > "$work/gateway.toml"
cat >> "$work/gateway.toml" <<'TOML'

[[bindings]]
device = "sim-meter-1"
patient = "p-ci-0001"

[[simulated]]
kind = "glucometer"
id = "sim-meter-1"
stored = 3
connect_every_s = 2
TOML
chmod 644 "$work/gateway.toml"
timeout 60 mosquitto_sub -h 127.0.0.1 -p "$port" -t 'phg/v1/+/readings' -C 1 -W 60 > "$work/reading.json" &
sub_pid=$!
sleep 1
setpriv --reuid=phg --regid=phg --init-groups --no-new-privs \
  /usr/bin/phg-gateway run --config "$work/gateway.toml" 2> "$work/gateway.log" &
gateway_pid=$!
wait "$sub_pid" || { cat "$work/gateway.log"; fail "no reading arrived at the broker"; }
grep -q '"schema":"phg.reading/1"' "$work/reading.json" || fail "not a reading: $(cat "$work/reading.json")"
echo "ok: a reading arrived: $(head -c 120 "$work/reading.json")…"
status_json=$(setpriv --reuid=phg --regid=phg --init-groups /usr/bin/phg-gateway status --json -c "$work/gateway.toml") \
  || fail "phg-gateway status (as phg) exit $?: $status_json"
echo "ok: phg-gateway status (as phg): healthy"
expect_stat /var/lib/phg phg:phg 750
expect_stat /var/lib/phg/journal phg:phg 700
expect_stat /var/lib/phg/gateway.sock phg:phg 660
kill -TERM "$gateway_pid"
wait "$gateway_pid" || fail "the gateway did not stop cleanly on SIGTERM"
gateway_pid=""

step "dpkg --purge phg-gateway"
$SUDO dpkg --purge phg-gateway
for p in /usr/bin/phg-gateway /etc/phg /var/lib/phg /usr/lib/systemd/system/phg-gateway.service /usr/share/doc/phg-gateway; do
  [ ! -e "$p" ] || fail "$p is left after purge"
done
! getent passwd phg >/dev/null || fail "user phg is left after purge"
! getent group phg >/dev/null || fail "group phg is left after purge"
! dpkg-statoverride --list /etc/phg/gateway.toml >/dev/null || fail "a statoverride is left after purge"
echo "ok: nothing left"

step "the arm64 binaries under qemu-aarch64-static"
for deb in "$gw_arm64" "$in_arm64"; do dpkg-deb -x "$deb" "$work/arm64"; done
file "$work/arm64/usr/bin/phg-gateway" | grep -q 'ARM aarch64' || fail "phg-gateway in $gw_arm64 is not arm64"
qemu() { timeout 120 qemu-aarch64-static -L /usr/aarch64-linux-gnu "$@"; }
qemu "$work/arm64/usr/bin/phg-gateway" --version
qemu "$work/arm64/usr/bin/phg-gateway" decode 2A18 133100E2070A060F2F325CFE7EB0FA | grep -q '"sequence_number":49' \
  || fail "the arm64 gateway does not decode"
echo "ok: the arm64 gateway decodes"
qemu "$work/arm64/usr/bin/phg-ingest" --version

step "figures"
for deb in "$gw_amd64" "$in_amd64" "$gw_arm64" "$in_arm64"; do
  printf '%-60s %8s bytes  (installed %s KiB)\n' "$(basename "$deb")" "$(stat -c %s "$deb")" \
    "$(dpkg-deb -f "$deb" Installed-Size)"
done
for b in phg-gateway phg-ingest; do
  printf 'arm64 %-12s %10s bytes stripped\n' "$b" "$(stat -c %s "$work/arm64/usr/bin/$b")"
done
packaging/check-units.sh | grep exposure
