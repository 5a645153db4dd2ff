#!/usr/bin/env bash
# The project's test command: checks formatting and lints, then runs every
# test (unit, store conformance, end-to-end against the real binary).
# It provides what the tests need: FerretDB (built once, see ferretdb.sh) and
# Debian's redis-server (installed with apt-get when it is missing).
# Usage: scripts/test.sh            (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== FerretDB (the MongoDB-wire server the MongoDB tests run against)"
if [[ -n "${MONGO_URI:-}" ]]; then
    echo "MONGO_URI is set: the MongoDB tests use that server instead"
else
    # Built once from the Go module proxy and cached; needs the Go toolchain.
    scripts/ferretdb.sh build >/dev/null
fi
echo "== redis-server (the broker tests start their own instances of it)"
# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "redis-server is not installed, and installing it needs root or sudo: run 'apt-get install redis-server' as root" >&2
        exit 1
    fi
}
if ! command -v redis-server >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "redis-server is not installed and there is no apt-get to install it: install Redis (redis-server on PATH) first" >&2
        exit 1
    fi
    # Debian's package. The tests start and stop servers of their own, so
    # the system service the package may start is neither used nor touched.
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "redis-server is still not on PATH after 'apt-get install -y redis-server'; the broker tests need it" >&2
        exit 1
    fi
fi
echo "$(command -v redis-server): $(redis-server --version)"
echo "== cargo test"
cargo test --locked -- --include-ignored
