#!/usr/bin/env bash
# The whole test suite: installs what the tests need when it is missing, then runs every test
# (unit, raw-protocol integration, real clients, memcached crash and node-loss, Prometheus and
# OTLP) against a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo build --release --all-targets
cargo test --release --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
