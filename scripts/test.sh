#!/usr/bin/env bash
# The project's test command: checks formatting and lints, then runs every
# test (unit, store conformance, end-to-end against the real binary).
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
echo "== cargo test"
cargo test --locked -- --include-ignored
