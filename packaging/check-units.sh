#!/usr/bin/env bash
# Checks the two systemd units offline (systemd need not be PID 1) and prints, per unit, the exposure
# score of `systemd-analyze security --offline=true` and what `systemd-analyze verify` says. Fails when a
# score is above 2.0 or verify prints anything (it reports unknown keys as warnings with exit status 0).
#
#   packaging/check-units.sh            the units in packaging/ (ExecStart pointed at target/release/…
#                                       when /usr/bin/phg-* is not installed: verify wants the binary)
#   packaging/check-units.sh --installed  the units the packages installed in /usr/lib/systemd/system
#                                         (a package not installed is skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

installed=false
[ "${1:-}" = "--installed" ] && installed=true
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
for pkg in gateway ingest; do
  unit="phg-$pkg.service"
  if $installed; then
    file="/usr/lib/systemd/system/$unit"
    [ -e "$file" ] || { echo "$unit: not installed (skipped)"; continue; }
  else
    file="$work/$unit"
    cp "packaging/$pkg/$unit" "$file"
    if [ ! -x "/usr/bin/phg-$pkg" ]; then
      bin="${PHG_BIN_DIR:-$PWD/target/release}/$pkg"
      [ -x "$bin" ] || { echo "$unit: no /usr/bin/phg-$pkg and no $bin to verify ExecStart against"; exit 1; }
      sed -i "s|/usr/bin/phg-$pkg|$bin|" "$file"
    fi
  fi
  # --threshold=20: exit non-zero above exposure 2.0.
  score_line=$(systemd-analyze security --offline=true --threshold=20 "$file" 2>&1 | grep 'Overall exposure') \
    || { echo "$unit: exposure above 2.0"; systemd-analyze security --offline=true "$file" | grep -v '^✓' ; fail=1; }
  echo "$unit: ${score_line#→ }"
  verify=$(systemd-analyze verify "$file" 2>&1) || fail=1
  if [ -n "$verify" ]; then
    echo "$unit: systemd-analyze verify:"; echo "$verify"; fail=1
  else
    echo "$unit: systemd-analyze verify: clean"
  fi
done
exit $fail
