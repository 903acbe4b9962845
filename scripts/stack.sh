#!/bin/bash
# Provides the virtualization stack a guest is booted with: a QEMU and a Debian guest kernel.
#
# Usage: scripts/stack.sh [STACK]
#   debian12  (default) the host's own QEMU 7.2 (Debian 12's qemu-system-x86, installed with apt) and
#             Debian 12's Linux 6.1 guest kernel (fetched by build-guest.sh from the linux-image-amd64
#             package); prints "QEMU -"
#   debian13  Debian 13 ("trixie"): QEMU 10.0 and Linux 6.12
#   forky     Debian testing ("forky"): QEMU 11.1 and Linux 7.2, the first QEMU whose generic
#             vhost-user device gives the guest a DAX window served by the back end
#   For debian13 and forky, prints "QEMU KROOT": a wrapper that runs that release's QEMU on this host
#   and the root of a tree holding its kernel (KROOT/boot/vmlinuz-*, KROOT/lib/modules/*).
#
# The newer stacks are Debian's own packages unpacked with debootstrap into
# $VHOSTFS_STACK_CACHE/SUITE (default /var/cache/vhostfs/stacks; about 800 MB each, fetched once and
# kept outside any clone). The host's packages are never changed: the wrapper runs QEMU through the
# tree's own dynamic loader and libraries, so host paths (sockets, shared directories) mean the same
# to it as to the host. Exits 3 when the stack cannot be had here (see common.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
. "$here/common.sh"

stack=${1:-debian12}
case $stack in
    debian12)
        ensure_guest_tools || exit
        echo "$(command -v qemu-system-x86_64) -"
        exit 0
        ;;
    debian13) suite=trixie ;;
    forky) suite=forky ;;
    *) log "unknown stack $stack (debian12, debian13 or forky)"; exit 2 ;;
esac

cache=${VHOSTFS_STACK_CACHE:-/var/cache/vhostfs/stacks}
dir=$cache/$suite
root=$dir/root
qemu=$dir/bin/qemu-system-x86_64
mkdir -p "$cache" 2>/dev/null || { log "cannot create $cache"; exit "$VHOSTFS_EXIT_UNAVAILABLE"; }

# Two test runs may want the same stack at once: one unpacks it, the other waits and reuses it.
exec {lock_fd}>"$cache/.$suite.lock"
flock "$lock_fd"

# The stamp is written last, so an interrupted unpack is never taken for a complete one.
if [ ! -f "$dir/stamp" ] || ! "$qemu" --version >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt_install debootstrap || exit
    # The archive the host's apt sources name (deb822 or one-line format), with the suite changed.
    uri=$(awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || { log "no Debian archive in the apt sources"; exit "$VHOSTFS_EXIT_UNAVAILABLE"; }
    # Debian 12's debootstrap may predate the suite's script; sid's is the one testing releases use.
    script=/usr/share/debootstrap/scripts/$suite
    [ -e "$script" ] || script=/usr/share/debootstrap/scripts/sid
    rm -rf "$dir"
    mkdir -p "$dir/bin"
    log "unpacking Debian $suite's QEMU and kernel into $dir (log: $dir/debootstrap.log)"
    if ! debootstrap --variant=minbase --include=qemu-system-x86,linux-image-amd64 \
        "$suite" "$root" "$uri" "$script" >"$dir/debootstrap.log" 2>&1; then
        tail -n 5 "$dir/debootstrap.log" >&2
        log "debootstrap of $suite failed"
        exit "$VHOSTFS_EXIT_UNAVAILABLE"
    fi
    lib=$root/usr/lib/x86_64-linux-gnu
    # -L: the tree's firmware (SeaBIOS, option ROMs); QEMU_MODULE_DIR: its own loadable modules.
    cat >"$qemu" <<EOF
#!/bin/sh
QEMU_MODULE_DIR='$lib/qemu' exec '$lib/ld-linux-x86-64.so.2' --library-path '$lib' '$root/usr/bin/qemu-system-x86_64' -L '$root/usr/share/qemu' "\$@"
EOF
    chmod 755 "$qemu"
    "$qemu" --version >/dev/null || { log "the unpacked QEMU does not run"; exit "$VHOSTFS_EXIT_UNAVAILABLE"; }
    "$qemu" --version | head -n 1 >"$dir/stamp"
fi
echo "$qemu $root"
