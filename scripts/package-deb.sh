#!/bin/bash
# scripts/package-deb.sh [--no-build] [--out DIR] — build the Debian package nvmirror_<version>_<arch>.deb.
#
# Contents (Debian's paths; scripts/install.sh stays for installs from source into /usr/local):
#   /usr/sbin/{nvmirrord,nvmirrorctl,nvmirror-tiebreaker}
#   /usr/lib/systemd/system/{nvmirrord@,nvmirror-tiebreaker}.service,
#   /usr/lib/modules-load.d/nvmirror.conf,
#   /usr/lib/udev/rules.d/90-nvmirror.rules, /usr/lib/ocf/resource.d/nvmirror/nvmirror
#   /usr/share/man/man8/ (nvmirrord, nvmirrorctl and each of its commands, nvmirror-tiebreaker;
#   from clap)
#   bash, zsh and fish completions; /usr/share/doc/nvmirror/ (README, docs, examples,
#   the Grafana dashboard, copyright)
# Depends comes from dpkg-shlibdeps (the libraries the binaries link), plus kmod for the
# unit's modprobe. The maintainer scripts only reload systemd and udev and load ublk_drv;
# no service is enabled or started (under Pacemaker none must be).
# --no-build: package target/release as it is (default: cargo build --release first).
# --out DIR: where the .deb goes (default target/deb). Prints the .deb's path last.
set -euo pipefail

build=1 out=
while (($#)); do
	case $1 in
	--no-build) build=0 ;;
	--out) out=$2; shift ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
	*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin_dir=$target/release
out=${out:-$target/deb}
for tool in dpkg-deb dpkg-shlibdeps gzip; do
	command -v $tool >/dev/null || { echo "package-deb.sh: $tool is missing (Debian: dpkg-dev)" >&2; exit 1; }
done
if ((build)); then
	(cd "$repo" && cargo build --release --workspace)
fi
for b in nvmirrord nvmirrorctl nvmirror-tiebreaker; do
	[[ -x $bin_dir/$b ]] || { echo "package-deb.sh: $bin_dir/$b is missing; build first (or drop --no-build)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
doc=$root/usr/share/doc/nvmirror

install -d "$root/usr/sbin" "$root/usr/lib/systemd/system" "$root/usr/lib/modules-load.d" \
	"$root/usr/lib/udev/rules.d" "$root/usr/lib/ocf/resource.d/nvmirror" "$root/usr/share/man/man8" \
	"$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
	"$root/usr/share/fish/vendor_completions.d" "$doc/examples" "$root/DEBIAN"
install -m 0755 -s "$bin_dir/nvmirrord" "$bin_dir/nvmirrorctl" "$bin_dir/nvmirror-tiebreaker" "$root/usr/sbin/"
sed "s|/usr/local/sbin/|/usr/sbin/|g; s|/usr/local/share/|/usr/share/|g" "$repo/systemd/nvmirrord@.service" \
	>"$root/usr/lib/systemd/system/nvmirrord@.service"
sed "s|/usr/local/sbin/|/usr/sbin/|g; s|/usr/local/share/|/usr/share/|g" "$repo/systemd/nvmirror-tiebreaker.service" \
	>"$root/usr/lib/systemd/system/nvmirror-tiebreaker.service"
install -m 0644 "$repo/systemd/ublk.conf" "$root/usr/lib/modules-load.d/nvmirror.conf"
sed "s|/usr/local/sbin/|/usr/sbin/|g" "$repo/udev/90-nvmirror.rules" >"$root/usr/lib/udev/rules.d/90-nvmirror.rules"
install -m 0755 "$repo/scripts/ocf/nvmirror" "$root/usr/lib/ocf/resource.d/nvmirror/nvmirror"

"$bin_dir/nvmirrorctl" gen-docs "$work/gen" >/dev/null
install -m 0644 "$work"/gen/man8/*.8 "$root/usr/share/man/man8/"
gzip -9n "$root"/usr/share/man/man8/*.8
for b in nvmirrord nvmirrorctl nvmirror-tiebreaker; do
	install -m 0644 "$work/gen/completions/bash/$b.bash" "$root/usr/share/bash-completion/completions/$b"
	install -m 0644 "$work/gen/completions/zsh/_$b" "$root/usr/share/zsh/vendor-completions/"
	install -m 0644 "$work/gen/completions/fish/$b.fish" "$root/usr/share/fish/vendor_completions.d/"
done

install -m 0644 "$repo/README.md" "$repo"/docs/*.md "$repo/docs/grafana-dashboard.json" "$doc/"
install -m 0644 "$repo"/examples/*.toml "$repo"/examples/*.env "$doc/examples/"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nvmirror
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
find "$root" -type d -exec chmod 0755 {} +

# Depends: what the binaries link, as dpkg-shlibdeps reads it from the installed libraries.
mkdir -p "$work/shlibs/debian"
printf 'Source: nvmirror\n\nPackage: nvmirror\nArchitecture: any\n' >"$work/shlibs/debian/control"
shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O -e "$root/usr/sbin/nvmirrord" -e "$root/usr/sbin/nvmirrorctl" -e "$root/usr/sbin/nvmirror-tiebreaker" 2>/dev/null |
	sed -n 's/^shlibs:Depends=//p')
[[ -n $shlibs ]] || { echo "package-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

cat >"$root/DEBIAN/control" <<EOF
Package: nvmirror
Version: $version
Architecture: $arch
Maintainer: nvmirror developers <nvmirror@localhost>
Section: admin
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $shlibs, kmod
Recommends: rdma-core, ndctl
Suggests: pacemaker, resource-agents, prometheus
Description: block device mirrored through NVRAM on two servers
 nvmirror serves a ublk block device (/dev/ublkbN) whose writes are staged in NVRAM,
 copied over RDMA or TCP into the partner server's NVRAM, acknowledged once durable in
 both, and flushed to the storage medium in the background. When a server dies, the
 survivor replays every mirrored write and takes its ranges over.
 .
 This package has the daemon (nvmirrord), its control tool (nvmirrorctl), the systemd
 unit, udev rules and the Pacemaker resource agent ocf:nvmirror:nvmirror.
EOF
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
	udevadm control --reload >/dev/null 2>&1 || true
	modprobe ublk_drv >/dev/null 2>&1 || true
fi
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb=$out/nvmirror_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
