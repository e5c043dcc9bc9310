#!/usr/bin/env bash
# Relinks the gateway binary with the functions a running gateway uses first in .text, in one block.
#
#   packaging/order-text.sh PROFILE [TARGET]      # e.g. `dist aarch64-unknown-linux-gnu`, or `release`
#   packaging/order-text.sh --names [TOOL-PREFIX]  # mangled names on stdin -> the list's form on stdout
#
# Why: the kernel maps 64 KB of a binary around every page it faults in, so code that runs spread over the
# whole .text brings nearly all of it into memory. A running gateway executes ~1.7 MB of its 6.6 MB of
# text, and 6.2 MB of it was resident (docs/performance.md, "One arena, a paced simulator, the hot functions first"). lld lays the sections
# of the symbols named in --symbol-ordering-file first, in that order.
#
# The names are packaging/gateway/hot-functions.txt (made by packaging/hot-functions.sh), demangled and
# without the crate hashes, so that one list serves every target and survives rebuilds; a name that no
# longer exists is simply not found. Two links of the binary (cargo rustc, which builds what is missing
# first, with the gateway's own dependency features): one unstripped, to read its symbols, and the final one
# with the order, stripped as the profile says; the second reuses everything but the binary's own crate. A cross build links through lld (Debian's `lld` package): GNU ld has no ordering file.
set -euo pipefail
cd "$(dirname "$0")/.."

# Demangled, without the crate hashes (v0 `crate[0123abcd]`, legacy `::h0123456789abcdef`): the form of
# the list, the same for every target.
names() { "${1:-}c++filt" | sed -E 's/\[[0-9a-f]+\]//g; s/::h[0-9a-f]{16}$//'; }
if [ "${1:-}" = --names ]; then
  names "${2:-}"
  exit
fi

profile=${1:?usage: packaging/order-text.sh PROFILE [TARGET]}
target=${2:-}
dir=${CARGO_TARGET_DIR:-target}
hot=packaging/gateway/hot-functions.txt
target_args=()
link_args=()
tools=""
if [ -n "$target" ]; then
  target_args=(--target "$target")
  out=$dir/$target/$profile
  if [ "$target" != "$(rustc -vV | sed -n 's/^host: //p')" ]; then
    tools=${target%%-unknown-*}-linux-gnu-
    command -v ld.lld >/dev/null || {
      echo "packaging/order-text.sh: ld.lld not found (apt-get install -y lld): a cross link needs lld" >&2
      exit 1
    }
    # Debian's cross gcc 12 finds neither `-fuse-ld=lld` (it looks for a target-prefixed ld.lld) nor
    # `--ld-path`: it takes the `ld` of a -B directory first, so one holds lld under that name.
    mkdir -p "$out/lld"
    ln -sf "$(command -v ld.lld)" "$out/lld/ld"
    link_args=(-C link-arg=-B"$(realpath "$out/lld")")
  fi
else
  out=$dir/$profile
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

relink() {
  cargo rustc --profile "$profile" -p gateway --bin gateway --no-default-features "${target_args[@]}" \
    --quiet -- "${link_args[@]}" "$@"
}

relink -C strip=none
"${tools}nm" --defined-only "$out/gateway" | awk '$2 ~ /^[tTwW]$/ { print $3 }' >"$work/mangled"
names "$tools" <"$work/mangled" >"$work/demangled"
paste -d '\t' "$work/mangled" "$work/demangled" \
  | awk -F '\t' 'NR == FNR { hot[$0] = 1; next } ($2 in hot) { print $1 }' "$hot" - >"$work/order"
# Named by its content: cargo tells link variants apart by their arguments, not by the files they name, so
# an unchanged order finds its link fresh (a rerun after `cargo build` costs seconds) and a new one relinks.
# (A later `cargo build -p gateway` puts the unordered binary back in place; packaging builds only ingest so.)
order=$(realpath "$out")/gateway-order-$(sha256sum "$work/order" | cut -c1-16).txt
mv "$work/order" "$order"
echo "order-text: $(wc -l <"$order") of $(wc -l <"$work/mangled") functions first in .text ($hot: $(wc -l <"$hot") names)"
# A list that has drifted from the code would leave the binary unordered without a word: refuse it.
if [ "$(wc -l <"$order")" -lt "$(($(wc -l <"$hot") / 2))" ]; then
  echo "packaging/order-text.sh: fewer functions found than half the list: rerun packaging/hot-functions.sh" \
    "(or, if RUSTFLAGS is set, add -Csymbol-mangling-version=v0: it replaces .cargo/config.toml's flags)" >&2
  exit 1
fi
relink -C link-arg=-Wl,--symbol-ordering-file="$order" -C link-arg=-Wl,--no-warn-symbol-ordering
