#!/usr/bin/env bash
# The boot benchmark (its driver is vm-tests/src/bin/boot-bench.rs): when the image's own init starts,
# booted with initramfs-tools from an exported root, with a do-nothing floor initramfs,
# and with layerboot from the store; BOOTS=3 boots each, medians, overheads and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAYERBOOT_FIXTURES=${LAYERBOOT_FIXTURES:-$PWD/target/fixtures}
bash tests/setup-host.sh
bash tests/fixtures/build-stores.sh
source tests/fixtures/mount.sh
cargo build --release -q
cargo build --release -q -p vm-tests --bins
target/x86_64-unknown-linux-musl/release/boot-bench
