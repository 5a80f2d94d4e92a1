#!/usr/bin/env bash
# Instructions breakwater executes per proxied request, counted by valgrind's
# cachegrind: deterministic to ~0.2% between runs, where CPU time per request
# on this shared machine drifts by a quarter (docs/benchmarks.md, §1e).
#
# Usage: docs/benchmarks/instructions-per-request.sh [BREAKWATER] [bench overhead args...]
#   e.g. docs/benchmarks/instructions-per-request.sh target/release/breakwater --http2
#        docs/benchmarks/instructions-per-request.sh nginx --http2
#
# With `nginx` in place of the binary it counts nginx instead (the bench's
# --with-nginx target; master and workers summed): the same requests through
# the proxy an operator would compare us with.
#
# Runs `loadtest bench overhead` twice (2,000 and 6,000 requests, 8 clients,
# one round, no warm-up) with breakwater under cachegrind, and prints the
# difference of the two totals divided by 4,000: start-up, handshakes and the
# once-only work cancel out. User-space instructions only (the kernel's share
# is not counted), so it ranks changes to our own and our libraries' code,
# not to syscalls. Needs valgrind (Debian: apt-get install valgrind) and a
# release build of the loadtest (cargo build --release -p breakwater-loadtest).
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${1:-target/release/breakwater}
[ $# -gt 0 ] && shift
target=breakwater
if [ "$bin" = nginx ]; then
  target=nginx
  bin=$(command -v nginx || echo /usr/sbin/nginx)
  [ -x "$bin" ] || { echo "nginx not found: apt-get install nginx-light" >&2; exit 1; }
fi
bin=$(realpath "$bin")
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
loadtest=target/release/loadtest
[ -x "$loadtest" ] || { echo "$loadtest not found: cargo build --release -p breakwater-loadtest" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# nginx's workers drop root for `nobody`: they too must write their counts.
chmod 777 "$work"
# The bench starts breakwater (and nginx) itself: give it a wrapper that runs
# the counted one under cachegrind (which follows nginx's forks: %p names
# each process's file).
cat > "$work/wrap" <<EOF
#!/bin/sh
exec valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=$work/cg.%p.out "$bin" "\$@"
EOF
chmod +x "$work/wrap"

total() {
  rm -f "$work"/cg.*.out
  if [ "$target" = nginx ]; then
    set -- "$1" --with-nginx --nginx "$work/wrap" "${@:2}"
  else
    set -- "$1" --breakwater "$work/wrap" "${@:2}"
  fi
  "$loadtest" bench overhead --rounds 1 --warmup 0s --duration 120s --clients 8 \
    --max-requests "$@" > "$work/log" 2>&1 \
    || { tail -5 "$work/log" >&2; exit 1; }
  grep -h '^summary:' "$work"/cg.*.out | awk '{ s += $2 } END { print s }'
}

small=$(total 2000 "$@")
large=$(total 6000 "$@")
echo "$(( (large - small) / 4000 )) instructions per request ($(basename "$bin") $*; totals $small, $large)"
