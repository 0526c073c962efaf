#!/usr/bin/env bash
# The boot benchmark (its driver is vm-tests/src/bin/boot-bench.rs): when the image's own init starts,
# booted with initramfs-tools from an exported root, a do-nothing floor initramfs, a minimal
# initramfs on that root, and layerboot from the store; ROUNDS=3 rounds under -icount
# (TCG_ROUNDS=N more on the wall clock), medians, layerboot's cost over the minimal.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAYERBOOT_FIXTURES=${LAYERBOOT_FIXTURES:-$PWD/target/fixtures}
bash tests/setup-host.sh
bash tests/fixtures/build-stores.sh
source tests/fixtures/mount.sh
cargo build --release -q
cargo build --release -q -p vm-tests --bins
target/x86_64-unknown-linux-musl/release/boot-bench
