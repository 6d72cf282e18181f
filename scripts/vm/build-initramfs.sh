#!/bin/bash
# scripts/vm/build-initramfs.sh MODROOT KVER OUT.cpio.gz
#
# Builds the tiny stage-1 initramfs: static busybox, the kernel modules needed
# to mount the host root over virtio-9p and to put a tmpfs overlay on it, and
# scripts/vm/initramfs-init.sh as /init.  Everything else (bash, modprobe, the
# tests, the project's binaries) comes from the host root at run time, so this
# image only changes when this script, initramfs-init.sh, busybox or the
# kernel change (lib.sh rebuilds it then).
set -euo pipefail

modroot=$1 kver=$2 out=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! /bin/busybox --list 2>/dev/null | grep -qx switch_root; then
	echo "build-initramfs: need static busybox (apt-get install busybox-static)" >&2
	exit 1
fi
# ldd fails on static binaries; a dynamic busybox would not run in the initramfs.
if ldd /bin/busybox >/dev/null 2>&1; then
	echo "build-initramfs: /bin/busybox is dynamic; install busybox-static" >&2
	exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,lower,rw,newroot,modules}
cp /bin/busybox "$work/bin/busybox"
cp "$here/initramfs-init.sh" "$work/init"
chmod 755 "$work/init" "$work/bin/busybox"

# Resolve the modules (and their dependencies, in load order) with the host's
# modprobe against the unpacked tree.  virtio_pci is built into Debian's
# kernel; anything that turns out built in is reported as "builtin" and
# skipped.  Modules are .ko.xz: decompress so busybox insmod can load them.
wanted=(9pnet_virtio 9p overlay)
: >"$work/modules/order"
while read -r kind path _; do
	[[ $kind == insmod ]] || continue
	base=$(basename "$path")
	base=${base%.xz}
	base=${base%.zst}
	base=${base%.gz}
	[[ -e $work/modules/$base ]] && continue
	case $path in
	*.xz) xz -dc "$path" >"$work/modules/$base" ;;
	*.zst) zstd -dqc "$path" >"$work/modules/$base" ;;
	*.gz) gzip -dc "$path" >"$work/modules/$base" ;;
	*) cp "$path" "$work/modules/$base" ;;
	esac
	echo "$base" >>"$work/modules/order"
done < <(modprobe -a -d "$modroot" -S "$kver" --show-depends "${wanted[@]}")
grep -q '^9p.ko$' "$work/modules/order" || { echo "build-initramfs: 9p module not found for $kver" >&2; exit 1; }

(cd "$work" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1); modules: $(tr '\n' ' ' <"$work/modules/order"))" >&2
