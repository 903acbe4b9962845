#!/bin/bash
# Builds the guest that the e2e tests and run-qemu.sh boot: Debian's kernel (the linux-image-amd64
# package) and a busybox initramfs whose /init (scripts/guest-init) mounts the virtio-fs share.
#
# Usage: scripts/build-guest.sh [--stack STACK] [OUT]
#   STACK is one of scripts/stack.sh's: debian12 (default: the host's QEMU 7.2, a Linux 6.1 guest),
#   debian13 (QEMU 10.0, Linux 6.12) or forky (QEMU 11.1, Linux 7.2).
#   OUT defaults to $VHOSTFS_GUEST_DIR, else /var/tmp/vhostfs-guest, with "-STACK" appended for stacks
#   other than debian12. Prints "OUT/vmlinuz OUT/initrd.img QEMU", QEMU being the stack's emulator.
#   Missing host tools are installed with apt-get (as root). Exits 3 when something needed cannot be
#   had here (not root, no apt, no network), so that callers can tell "unavailable" from "broken".
#
# A second run is quick: the kernel .deb (debian12) is kept in OUT/kernels/, the other stacks' trees in
# stack.sh's cache, and the initramfs is rebuilt only when the kernel or the files it is made from
# (this script, guest-init, the host programs it copies in) change.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
. "$here/common.sh"

stack=debian12
if [ "${1:-}" = --stack ]; then
    [ $# -ge 2 ] || { log "--stack needs a value"; exit 2; }
    stack=$2
    shift 2
fi
default_out=${VHOSTFS_GUEST_DIR:-/var/tmp/vhostfs-guest}
[ "$stack" = debian12 ] || default_out=$default_out-$stack
out=${1:-$default_out}
mkdir -p "$out/kernels"
out=$(cd "$out" && pwd)

# The test session and run-qemu.sh may build at the same time: one builds, the other waits and reuses.
exec {lock_fd}>"$out/.lock"
flock "$lock_fd"

ensure_guest_tools || exit
# fio drives the load test (tests/e2e/test_load.py); a guest without it still serves every other test,
# so failing to install it is not fatal: that test then skips, saying fio is missing.
command -v fio >/dev/null || apt_install fio || log "no fio on the host: the guest will not have it"
# The semantics tests (tests/e2e/test_guest_semantics.py) make the guest kernel's system calls with
# these host programs: extended attributes (attr), ACLs (acl), preallocation, holes, copy_file_range and
# nanosecond times (xfs_io), flock(2) and running as another user (util-linux), and POSIX record locks
# (sqlite3, which takes them with fcntl(2)), and inode flags such as chattr +x, the per-file DAX
# attribute (e2fsprogs' chattr and lsattr, which use FS_IOC_SETFLAGS). As with fio, a missing one only makes the tests that use it
# skip, naming it.
declare -A tool_package=([getfattr]=attr [setfattr]=attr [getfacl]=acl [setfacl]=acl [xfs_io]=xfsprogs
    [flock]=util-linux [setpriv]=util-linux [sqlite3]=sqlite3 [chattr]=e2fsprogs [lsattr]=e2fsprogs)
guest_tools=(getfattr setfattr getfacl setfacl xfs_io flock setpriv sqlite3 chattr lsattr)
mapfile -t tool_packages < <(for tool in "${guest_tools[@]}"; do
    command -v "$tool" >/dev/null || echo "${tool_package[$tool]}"
done | sort -u)
if [ ${#tool_packages[@]} -gt 0 ]; then
    apt_install "${tool_packages[@]}" || log "continuing without ${tool_packages[*]}: the guest will lack their programs"
fi
# The DAX tests (tests/e2e/test_dax.py) map files private and watch for SIGBUS with a program of the
# project's own, guest-mmap-probe.c, built statically here; without a compiler they skip, naming it.
command -v gcc >/dev/null || apt_install gcc libc6-dev || log "no gcc on the host: the guest will lack mmap-probe"

# kernel_id names the kernel the guest boots (it goes into the stamp); kernel_tree DIR prints the root of
# a tree holding it (boot/vmlinuz-*, lib/modules/* with modules.dep), unpacking it into DIR if need be.
stack_paths=$("$here/stack.sh" "$stack") || exit
read -r qemu kroot <<<"$stack_paths"
if [ "$stack" = debian12 ]; then
    # Prints the .deb file name (PACKAGE_VERSION_amd64.deb) of the kernel that linux-image-amd64
    # currently depends on, or nothing when the package lists do not know it.
    candidate_kernel_deb() {
        local pkg ver
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
        [ -n "$pkg" ] || return 0
        ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2 }')
        [ -n "$ver" ] && [ "$ver" != "(none)" ] && echo "${pkg}_${ver//:/%3a}_amd64.deb"
    }

    deb=$(candidate_kernel_deb || true)
    if [ -z "$deb" ]; then
        # Offline or never-updated package lists: an already downloaded kernel will do.
        deb=$(find "$out/kernels" -maxdepth 1 -name '*.deb' -printf '%T@ %f\n' | sort -rn | awk 'NR == 1 { print $2 }')
    fi
    if [ -z "$deb" ]; then
        apt_update || exit
        deb=$(candidate_kernel_deb || true)
        [ -n "$deb" ] || { log "cannot find a linux-image-amd64 kernel with apt"; exit "$VHOSTFS_EXIT_UNAVAILABLE"; }
    fi

    # download_kernel DEB: fetches the kernel package into OUT/kernels; fails if apt cannot provide DEB.
    download_kernel() {
        local deb=$1 dl
        log "downloading ${deb%%_*}"
        dl=$(mktemp -d "$out/kernels/download.XXXXXX")
        # apt-get download writes to the current directory; its unsandboxed-as-root warning is harmless.
        (cd "$dl" && apt-get download "${deb%%_*}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
        if [ -f "$dl/$deb" ]; then mv "$dl/$deb" "$out/kernels/$deb"; fi
        rm -rf "$dl"
        [ -f "$out/kernels/$deb" ]
    }

    if [ ! -f "$out/kernels/$deb" ] && ! download_kernel "$deb"; then
        # Package lists older than the mirror name a kernel it no longer has: refresh them, try once more.
        apt_update || exit
        deb=$(candidate_kernel_deb || true)
        if [ -z "$deb" ] || ! download_kernel "$deb"; then
            log "cannot download the kernel"
            exit "$VHOSTFS_EXIT_UNAVAILABLE"
        fi
    fi
    kernel_id=$deb
    kernel_tree() {
        dpkg-deb -x "$out/kernels/$deb" "$1"
        # Debian generates modules.dep in the package's postinst, so the extracted tree has none yet.
        depmod -b "$1" "$(ls "$1/lib/modules")"
        echo "$1"
    }
else
    kernel_id="$stack $(ls "$kroot/lib/modules") $(stat -c %Y "$kroot"/boot/vmlinuz-*)"
    # debootstrap ran the kernel package's postinst, so the stack's tree is complete as it is.
    kernel_tree() { echo "$kroot"; }
fi

# The host programs copied in are part of the stamp too: installing or upgrading one changes the guest.
programs_id=$(for tool in fio "${guest_tools[@]}"; do
    if path=$(command -v "$tool"); then echo "$tool $(sha256sum <"$path")"; else echo "$tool none"; fi
done | sha256sum | cut -d' ' -f1)
stamp="$kernel_id $(cat "${BASH_SOURCE[0]}" "$here/guest-init" "$here/guest-mmap-probe.c" | sha256sum | cut -d' ' -f1) programs=$programs_id"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$out/vmlinuz $out/initrd.img $qemu"
    exit 0
fi

log "building the initramfs for $kernel_id"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
ktree=$(kernel_tree "$work/kernel")
kver=$(ls "$ktree/lib/modules")

root=$work/initramfs
mkdir -p "$root/bin" "$root/lib/vhostfs-modules"
cp "$(command -v busybox)" "$root/bin/busybox"
cp "$here/guest-init" "$root/init"
chmod 755 "$root/init"

# add_program PATH DEST: copies the host program PATH to DEST in the initramfs, with every shared
# library it links against and the dynamic loader, each at the path ldd names (symlinks resolved), so
# that the loader finds them in the guest as it does on the host: by its default directories, and by
# RUNPATH for the ones outside them (e.g. fio's ceph/).
add_program() {
    local program=$1 dest=$2 lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$program" "$root$dest"
    # Lines are "name => /path (addr)", or "/path (addr)" for the loader; the vDSO has no file.
    ldd "$program" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
        while read -r lib; do
            if [ ! -e "$root$lib" ]; then
                mkdir -p "$root$(dirname "$lib")"
                cp -L "$lib" "$root$lib"
            fi
        done
}
if fio=$(command -v fio); then
    add_program "$fio" /usr/bin/fio
fi
if command -v gcc >/dev/null; then
    gcc -static -O2 -Wall -o "$root/bin/mmap-probe" "$here/guest-mmap-probe.c" ||
        log "could not build mmap-probe: the guest will lack it"
fi
# In /bin, where guest-init's `busybox --install -s` leaves them alone. Busybox's sh still runs its own
# applet of the same name (its setpriv, which lacks --reuid) unless a script calls /bin/NAME.
for tool in "${guest_tools[@]}"; do
    if path=$(command -v "$tool"); then
        add_program "$path" "/bin/$tool"
    fi
done

# modprobe resolves the dependencies and prints them in load order (one "insmod PATH" line per
# module, repeated when two modules share a dependency); busybox's insmod then loads them in that order.
# Modules built into the kernel (virtio_pci, fuse and virtiofs in Linux 6.12) come out as "builtin"
# lines, so the list may be empty.
: >"$root/lib/vhostfs-modules/load-order"
modprobe -d "$ktree" -S "$kver" --show-depends -a virtio_pci virtiofs |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$work/modules"
while read -r ko; do
    name=${ko##*/}
    case $name in
        # Busybox's insmod wants plain ELF; newer Debian kernels compress their modules.
        *.ko.xz) xz -dc "$ko" >"$root/lib/vhostfs-modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" >"$root/lib/vhostfs-modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$ko" "$root/lib/vhostfs-modules/$name" ;;
    esac
    echo "$name" >>"$root/lib/vhostfs-modules/load-order"
done <"$work/modules"

# Owned by root inside the guest whoever builds it; gzip because the kernel can always unpack it.
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) | gzip -6 >"$work/initrd.img"
cp "$ktree/boot/vmlinuz-$kver" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.img" "$out/initrd.img"
echo "$stamp" >"$out/stamp"
# Keep only the kernel that is in use.
find "$out/kernels" -maxdepth 1 -name '*.deb' ! -name "${deb:-}" -delete
echo "$out/vmlinuz $out/initrd.img $qemu"
