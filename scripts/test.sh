#!/usr/bin/env bash
# The project's test command: checks formatting and lints, then runs every
# test (unit, store conformance, end-to-end against the real binary).
# It provides what the tests need: FerretDB (built once, see ferretdb.sh),
# Debian's redis-server and chromium (installed with apt-get when missing).
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
# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "installing what the tests need takes root or sudo: run '$*' as root" >&2
        exit 1
    fi
}
# apt_install PROGRAM PACKAGE WHY: install Debian's PACKAGE when PROGRAM is
# not on PATH (the tests start their own instances; a system service the
# package may start is neither used nor touched).
apt_updated=""
apt_install() {
    local program=$1 package=$2 why=$3
    command -v "$program" >/dev/null 2>&1 && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$program is not installed and there is no apt-get to install it: install $package first ($why)" >&2
        exit 1
    fi
    if [[ -z $apt_updated ]]; then
        as_root apt-get update
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$package"
    if ! command -v "$program" >/dev/null 2>&1; then
        echo "$program is still not on PATH after 'apt-get install -y $package'; $why" >&2
        exit 1
    fi
}
echo "== redis-server (the broker tests start their own instances of it)"
apt_install redis-server redis-server "the broker tests need it"
echo "$(command -v redis-server): $(redis-server --version)"
echo "== chromium (the web client's tests drive it headless over DevTools)"
apt_install chromium chromium "the browser tests (tests/browser.rs) need it"
echo "$(command -v chromium): $(chromium --version 2>/dev/null)"
echo "== cargo test"
cargo test --locked -- --include-ignored
