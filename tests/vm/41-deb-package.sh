#!/bin/bash
# The Debian package (issue #19, item 5): scripts/package-deb.sh builds it from the release
# binaries (scripts/test.sh does that on the host and passes it as NVM_DEB), `dpkg -i` installs it (into an overlay over /usr and /var: the VM's root is the
# host's, read-only), and a node runs from the installed paths: /usr/sbin/nvmirrord serves
# /dev/ublkb0, data written through it reads back after a drain, `nvmirrorctl health` says OK.
# The man pages, completions, unit (checked by systemd-analyze verify against /usr/sbin), udev
# rule and OCF agent are where Debian puts them; `dpkg -r` removes every file.
# vm-timeout: 240
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
for t in dpkg-deb dpkg-shlibdeps systemd-analyze; do
	command -v $t >/dev/null || fail "$t is not installed (scripts/test.sh installs dpkg-dev)"
done

# scripts/test.sh builds the package on the host (NVM_DEB); run alone, the test builds it.
if [[ -n ${NVM_DEB:-} ]]; then
	echo "$NVM_DEB" >pkg.out
else
	CARGO_TARGET_DIR=$(dirname "$NVM_BIN") bash "$NVM_REPO/scripts/package-deb.sh" --no-build --out "$PWD/deb" >pkg.out 2>&1 ||
		{ cat pkg.out; fail "package-deb.sh failed"; }
fi
deb=$(tail -n1 pkg.out)
[[ -f $deb ]] || { cat pkg.out; fail "package-deb.sh did not name a .deb"; }
dpkg-deb -f "$deb" Depends >depends.txt
grep -q "libibverbs1" depends.txt && grep -q "librdmacm1" depends.txt && grep -q "libc6" depends.txt ||
	fail "Depends lacks the linked libraries: $(cat depends.txt)"
say "built $(basename "$deb") ($(stat -c %s "$deb") bytes); Depends: $(cat depends.txt)"

# The node's medium now: the overlay over /usr hides the kernel modules bound into the VM's
# /usr/lib/modules, so the loop driver must be loaded before it.
medium=$(nvm_medium medium 64)
[[ -b $medium ]] || fail "no loop device for the medium"

# dpkg writes /usr and /var (its database, its log): overlays with the scratch dir on top.
overlays=()
for d in /usr /var; do
	mkdir -p "ov$d/upper" "ov$d/work"
	mount -t overlay "pkg-ov" -o "lowerdir=$d,upperdir=$PWD/ov$d/upper,workdir=$PWD/ov$d/work" "$d" ||
		fail "cannot put an overlay on $d"
	overlays+=("$d")
done
nvm_extra_cleanup() {
	local i
	for ((i = ${#overlays[@]} - 1; i >= 0; i--)); do umount -l "${overlays[i]}" 2>/dev/null; done
}
# No triggers: man-db's would index every man page of the host (minutes under TCG).
dpkg --no-triggers --log="$PWD/dpkg.log" -i "$deb" >dpkg-i.out 2>&1 || { cat dpkg-i.out; fail "dpkg -i failed"; }
[[ $(dpkg-query -W -f '${Status}' nvmirror) == "install ok installed" ]] || fail "dpkg does not list nvmirror as installed"
for f in /usr/sbin/nvmirrord /usr/sbin/nvmirrorctl /usr/lib/systemd/system/nvmirrord@.service \
	/usr/sbin/nvmirror-tiebreaker /usr/lib/systemd/system/nvmirror-tiebreaker.service \
	/usr/lib/udev/rules.d/90-nvmirror.rules /usr/lib/modules-load.d/nvmirror.conf \
	/usr/lib/ocf/resource.d/nvmirror/nvmirror /usr/share/man/man8/nvmirrord.8.gz \
	/usr/share/man/man8/nvmirrorctl.8.gz /usr/share/man/man8/nvmirrorctl-health.8.gz \
	/usr/share/man/man8/nvmirror-tiebreaker.8.gz \
	/usr/share/bash-completion/completions/nvmirrorctl /usr/share/zsh/vendor-completions/_nvmirrorctl \
	/usr/share/fish/vendor_completions.d/nvmirrorctl.fish /usr/share/doc/nvmirror/README.md \
	/usr/share/doc/nvmirror/examples/two-node-tcp-node-a.toml /usr/share/doc/nvmirror/copyright; do
	[[ -f $f ]] || fail "the package did not install $f"
done
zcat /usr/share/man/man8/nvmirrorctl.8.gz | grep -q '^\.TH nvmirrorctl 8' || fail "nvmirrorctl.8 is not a section-8 man page"
bash -c 'source /usr/share/bash-completion/completions/nvmirrorctl && complete -p nvmirrorctl' | grep -q nvmirrorctl ||
	fail "the bash completion does not register for nvmirrorctl"
grep -q '^ExecStart=/usr/sbin/nvmirrord ' /usr/lib/systemd/system/nvmirrord@.service || fail "the unit does not start /usr/sbin/nvmirrord"
rc=0
systemd-analyze verify /usr/lib/systemd/system/nvmirrord@.service /usr/lib/systemd/system/nvmirror-tiebreaker.service >verify.out 2>&1 || rc=$?
((rc == 0)) && [[ ! -s verify.out ]] || { cat verify.out; fail "systemd-analyze verify of the installed units: rc $rc or warnings"; }
/usr/sbin/nvmirrorctl config check /usr/share/doc/nvmirror/examples/two-node-tcp-node-a.toml >/dev/null 2>&1 ||
	fail "the installed nvmirrorctl refuses the installed example config"
say "dpkg -i: binaries in /usr/sbin, unit (systemd-analyze verify clean), udev rule, OCF agent, man pages, completions, docs"

# A node from the installed paths.
NVMD=/usr/sbin/nvmirrord NVMCTL=/usr/sbin/nvmirrorctl
nvm_config node.toml node-a "$PWD/nvram.img" 32 "$medium" 0
nvm_start node.toml daemon.log
pid=$NVM_LAST_PID
head -c 4M /dev/urandom >data
dd if=data of=/dev/ublkb0 bs=1M oflag=direct status=none
"$NVMCTL" --config node.toml drain --timeout 60 >/dev/null
[[ $(dd if=/dev/ublkb0 bs=1M count=4 iflag=direct status=none | md5sum) == $(md5sum <data) ]] ||
	fail "data written through the installed daemon does not read back"
"$NVMCTL" --config node.toml health >health.out || { cat health.out; fail "health of the installed node is not OK"; }
say "the installed nvmirrord served /dev/ublkb0: 4 MiB read back after a drain; $(head -n1 health.out)"
kill -TERM "$pid"
nvm_wait_gone "$pid"
NVMD=$NVM_BIN/nvmirrord NVMCTL=$NVM_BIN/nvmirrorctl

dpkg --no-triggers --log="$PWD/dpkg.log" -r nvmirror >dpkg-r.out 2>&1 || { cat dpkg-r.out; fail "dpkg -r failed"; }
for f in /usr/sbin/nvmirrord /usr/sbin/nvmirrorctl /usr/lib/systemd/system/nvmirrord@.service /usr/share/man/man8/nvmirrord.8.gz \
	/usr/sbin/nvmirror-tiebreaker /usr/lib/systemd/system/nvmirror-tiebreaker.service; do
	[[ -e $f ]] && fail "dpkg -r left $f"
done
say "PASS: built, installed with dpkg -i, ran a node from /usr/sbin, removed with dpkg -r"
