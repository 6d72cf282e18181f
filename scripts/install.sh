#!/bin/bash
# scripts/install.sh [--no-build] — install nvmirror on this machine (as root).
#
# Installs:
#   $PREFIX/sbin/{nvmirrord,nvmirrorctl}           the daemon and its control tool
#   /etc/systemd/system/nvmirrord@.service         one daemon per /etc/nvmirror/<name>.toml
#   $PREFIX/sbin/nvmirror-tiebreaker and           the third voter of a pair with
#   /etc/systemd/system/nvmirror-tiebreaker.service  [cluster.voters] (if built)
#   /etc/modules-load.d/nvmirror.conf              loads ublk_drv at boot
#   /etc/udev/rules.d/90-nvmirror.rules            /dev/disk/by-nvmirror/<lun>
#   /usr/lib/ocf/resource.d/nvmirror/nvmirror      the Pacemaker resource agent
#   /etc/nvmirror/examples/*.toml, *.env           example configs (never overwrites
#                                                  /etc/nvmirror/*.toml)
#   $PREFIX/share/doc/nvmirror/                    README and docs
# Environment: PREFIX (default /usr/local), DESTDIR (stage into a directory instead of /,
# e.g. for packaging; then nothing is reloaded).
# --no-build: use target/release as it is (default: cargo build --release first).
set -euo pipefail

build=1
case ${1:-} in
--no-build) build=0 ;;
-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
"") ;;
*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release

if ((build)); then
	(cd "$repo" && cargo build --release --workspace)
fi
for b in nvmirrord nvmirrorctl; do
	[[ -x $bin_dir/$b ]] || { echo "install.sh: $bin_dir/$b is missing; build with cargo build --release (or drop --no-build)" >&2; exit 1; }
done
if [[ -z $DESTDIR && $(id -u) -ne 0 ]]; then
	echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
	exit 1
fi

root=$DESTDIR
sbin=$PREFIX/sbin
install -d "$root$sbin" "$root/etc/systemd/system" "$root/etc/modules-load.d" \
	"$root/etc/udev/rules.d" "$root/usr/lib/ocf/resource.d/nvmirror" \
	"$root/etc/nvmirror/examples" "$root$PREFIX/share/doc/nvmirror"
install -m 0755 "$bin_dir/nvmirrord" "$bin_dir/nvmirrorctl" "$root$sbin/"
# The tie-breaker voter (a third machine of a pair with [cluster.voters]), if built.
if [[ -x $bin_dir/nvmirror-tiebreaker ]]; then
	install -m 0755 "$bin_dir/nvmirror-tiebreaker" "$root$sbin/"
	sed "s|/usr/local/sbin/|$sbin/|g; s|/usr/local/share/|$PREFIX/share/|g" \
		"$repo/systemd/nvmirror-tiebreaker.service" >"$root/etc/systemd/system/nvmirror-tiebreaker.service"
	chmod 0644 "$root/etc/systemd/system/nvmirror-tiebreaker.service"
fi
# The unit and the rules name the binaries: point them at $PREFIX.
sed "s|/usr/local/sbin/|$sbin/|g; s|/usr/local/share/|$PREFIX/share/|g" \
	"$repo/systemd/nvmirrord@.service" >"$root/etc/systemd/system/nvmirrord@.service"
chmod 0644 "$root/etc/systemd/system/nvmirrord@.service"
install -m 0644 "$repo/systemd/ublk.conf" "$root/etc/modules-load.d/nvmirror.conf"
sed "s|/usr/local/sbin/|$sbin/|g" "$repo/udev/90-nvmirror.rules" >"$root/etc/udev/rules.d/90-nvmirror.rules"
chmod 0644 "$root/etc/udev/rules.d/90-nvmirror.rules"
if [[ -f $repo/scripts/ocf/nvmirror ]]; then
	install -m 0755 "$repo/scripts/ocf/nvmirror" "$root/usr/lib/ocf/resource.d/nvmirror/nvmirror"
fi
install -m 0644 "$repo"/examples/*.toml "$repo"/examples/*.env "$root/etc/nvmirror/examples/"
install -m 0644 "$repo/README.md" "$root$PREFIX/share/doc/nvmirror/"
if [[ -d $repo/docs ]]; then
	install -m 0644 "$repo"/docs/*.md "$root$PREFIX/share/doc/nvmirror/"
fi

if [[ -z $DESTDIR ]]; then
	if command -v systemctl >/dev/null; then systemctl daemon-reload 2>/dev/null || true; fi
	if command -v udevadm >/dev/null; then udevadm control --reload 2>/dev/null || true; fi
	modprobe ublk_drv 2>/dev/null || echo "note: modprobe ublk_drv failed (kernel without ublk?)"
fi
echo "installed nvmirror into ${DESTDIR:-/} (binaries in $sbin)"
echo "next: write /etc/nvmirror/<node>.toml (see /etc/nvmirror/examples), check it with"
echo "      $sbin/nvmirrorctl config check /etc/nvmirror/<node>.toml"
echo "      then: systemctl enable --now nvmirrord@<node>   (or let Pacemaker run it: docs/pacemaker.md)"
