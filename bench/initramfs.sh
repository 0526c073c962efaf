#!/usr/bin/env bash
# Builds the initramfs for this machine's Debian kernel with layerboot and its peers,
# RUNS times each, and prints one table: median time, size, modules, ratios.
#   sudo bench/initramfs.sh            (RUNS=5 by default)
# Peers: Debian's mkinitramfs with MODULES=most (its default), dracut --no-hostonly and
# --hostonly (package dracut-core: the dracut package would remove initramfs-tools).
# Targets for layerboot's default set: >= 30x faster than mkinitramfs, <= 5 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
bash tests/setup-host.sh
need=()
for p in initramfs-tools dracut-core linux-image-amd64 bc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release -q
lb=$PWD/target/x86_64-unknown-linux-musl/release/layerboot
kver=$(ls /lib/modules | sort -V | while read -r k; do [ -f "/lib/modules/$k/modules.dep" ] && echo "$k"; done | tail -n 1)
[ -n "$kver" ] || { echo "bench: no kernel with modules.dep under /lib/modules" >&2; exit 1; }
work=$PWD/target/bench; rm -rf "$work"; mkdir -p "$work"
conf=$work/initramfs-tools; cp -r /etc/initramfs-tools "$conf"
sed -i 's/^MODULES=.*/MODULES=most/' "$conf/initramfs.conf"

declare -A cmd=(
  [layerboot]="$lb initramfs --rootfs / --kver $kver -o \$OUT"
  [layerboot-hostonly]="$lb initramfs --rootfs / --kver $kver --host-only -o \$OUT"
  [mkinitramfs]="mkinitramfs -d $conf -o \$OUT $kver"
  [dracut]="dracut --quiet --force --no-hostonly --kver $kver \$OUT"
  [dracut-hostonly]="dracut --quiet --force --hostonly --kver $kver \$OUT"
)
order=(layerboot layerboot-hostonly mkinitramfs dracut dracut-hostonly)

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
declare -A t size mods
for name in "${order[@]}"; do
  out=$work/$name.img
  times=()
  for i in $(seq "$runs"); do
    rm -f "$out"
    start=$(date +%s.%N)
    if ! OUT=$out bash -c "${cmd[$name]}" >"$work/$name.log" 2>&1; then
      echo "bench: $name failed:"; tail -5 "$work/$name.log"; continue 2
    fi
    end=$(date +%s.%N)
    times+=("$(echo "$end - $start" | bc)")
  done
  t[$name]=$(printf '%s\n' "${times[@]}" | median)
  size[$name]=$(stat -c %s "$out")
  mods[$name]=$(lsinitramfs "$out" 2>/dev/null | grep -c '\.ko' || true)
done

echo
echo "initramfs for kernel $kver, median of $runs runs ($(nproc) cores)"
printf '%-20s %10s %10s %8s %14s %12s\n' builder "time (s)" "size (MiB)" modules "time / layerboot" "size / layerboot"
for name in "${order[@]}"; do
  [ -n "${t[$name]:-}" ] || { printf '%-20s %10s\n' "$name" failed; continue; }
  printf '%-20s %10.3f %10.2f %8d %14.1fx %12.1fx\n' "$name" "${t[$name]}" "$(echo "${size[$name]} / 1048576" | bc -l)" "${mods[$name]}" \
    "$(echo "${t[$name]} / ${t[layerboot]}" | bc -l)" "$(echo "${size[$name]} / ${size[layerboot]}" | bc -l)"
done
speedup=$(echo "${t[mkinitramfs]:-0} / ${t[layerboot]}" | bc -l)
mib=$(echo "${size[layerboot]} / 1048576" | bc -l)
printf '\ntarget: >= 30x faster than mkinitramfs: %.1fx %s\n' "$speedup" "$([ "$(echo "$speedup >= 30" | bc)" = 1 ] && echo met || echo MISSED)"
printf 'target: <= 5 MiB: %.2f MiB %s\n' "$mib" "$([ "$(echo "$mib <= 5" | bc)" = 1 ] && echo met || echo MISSED)"
