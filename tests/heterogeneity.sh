#!/usr/bin/env bash
# Proves "any architecture": one agent hops x86_64 -> aarch64 -> s390x (big-endian) ->
# x86_64 between three real agent-host processes (the foreign ones under qemu-user), and its
# result must equal the result of the same agent on one host without migration.
# Installs what it needs on a fresh Debian machine (cross compilers, qemu-user, Rust targets).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-s390x-linux-gnu libc6-dev-s390x-cross qemu-user)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup target add wasm32-wasip1 aarch64-unknown-linux-gnu s390x-unknown-linux-gnu >/dev/null 2>&1

# One cargo call per target set; .cargo/config.toml names the cross linkers.
cargo build --quiet --bins
cargo build --quiet --bin agent-host --target aarch64-unknown-linux-gnu --target s390x-unknown-linux-gnu
wasm=$(target/debug/agent build examples/endian)

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP_WORK:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

host=target/debug/agent-host
$host certs init --dir "$work/certs" >/dev/null
for site in x86 arm z; do $host certs issue --dir "$work/certs" --host "$site" >/dev/null; done
$host certs issue --dir "$work/certs" --user tester >/dev/null

port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A addr=([x86]="127.0.0.1:$(port)" [arm]="127.0.0.1:$(port)" [z]="127.0.0.1:$(port)")
declare -A run=(
    [x86]="target/debug/agent-host"
    [arm]="qemu-aarch64 -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/debug/agent-host"
    [z]="qemu-s390x -L /usr/s390x-linux-gnu target/s390x-unknown-linux-gnu/debug/agent-host"
)
for site in x86 arm z; do
    peers=()
    for other in x86 arm z; do [ "$other" = "$site" ] || peers+=(--peer "$other=${addr[$other]}"); done
    # shellcheck disable=SC2086
    ${run[$site]} serve --name "$site" --listen "${addr[$site]}" --data-dir "$work/$site" \
        --certs "$work/certs" "${peers[@]}" --no-segmentation-offload >"$work/$site.out" 2>"$work/$site.log" &
    pids+=($!)
done

user=(--certs "$work/certs" --user tester)
for site in x86 arm z; do
    for _ in $(seq 1 300); do
        target/debug/agent list --host "$site@${addr[$site]}" "${user[@]}" >/dev/null 2>&1 && break
        sleep 0.2
    done
    target/debug/agent list --host "$site@${addr[$site]}" "${user[@]}" >/dev/null || {
        echo "host $site did not start:"; cat "$work/$site.log"; exit 1
    }
done
echo "hosts up: x86 ($(uname -m)) ${addr[x86]}, arm (qemu-aarch64) ${addr[arm]}, z (qemu-s390x) ${addr[z]}"

# Reference: the same four stops on one host (a hop to the host itself does not migrate).
target/debug/agent launch "$wasm" --hop x86,x86,x86 --host "x86@${addr[x86]}" "${user[@]}" >"$work/still.json" 2>"$work/still.err" || {
    cat "$work/still.err"; exit 1
}
start=$(date +%s.%N)
target/debug/agent launch "$wasm" --hop arm,z,x86 --host "x86@${addr[x86]}" "${user[@]}" >"$work/moved.json" 2>"$work/moved.err" || {
    cat "$work/moved.err"; for s in x86 arm z; do echo "--- $s"; tail -20 "$work/$s.log"; done; exit 1
}
end=$(date +%s.%N)
grep -v '^launched\|^hop [0-9]\|^agent ended' "$work/moved.err" || true
python3 - "$work/still.json" "$work/moved.json" "$start" "$end" <<'PY'
import json, sys
still, moved = (json.load(open(p)) for p in sys.argv[1:3])
print(f"x86_64 -> aarch64 -> s390x -> x86_64 in {float(sys.argv[4]) - float(sys.argv[3]):.1f} s")
if still != moved:
    print("RESULTS DIFFER\nwithout migration:", json.dumps(still, sort_keys=True), "\nmigrated:", json.dumps(moved, sort_keys=True))
    sys.exit(1)
if not (moved["ints_ok"] and moved["floats_ok"] and moved["stops"] == 4):
    print("the agent's own checks failed:", moved)
    sys.exit(1)
print("heterogeneity: 1 passed, 0 failed")
PY
