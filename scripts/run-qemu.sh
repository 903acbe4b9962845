#!/bin/bash
# Serves a host directory with vhostfs and boots a QEMU guest (TCG) that mounts it on /mnt.
#
# Usage: scripts/run-qemu.sh [options]
#   --shared-dir DIR          directory to share (default /var/tmp/vhostfs-share, created if missing)
#   --stack STACK             the QEMU and guest kernel: debian12 (default; the host's QEMU 7.2 and a
#                             Linux 6.1 guest), debian13 (QEMU 10.0, Linux 6.12) or forky (QEMU 11.1,
#                             Linux 7.2); the last two are Debian's packages, unpacked once into
#                             /var/cache/vhostfs/stacks without touching the host's (scripts/stack.sh)
#   --cmd 'SHELL COMMAND'     run it in the guest (cwd /mnt) and exit with its status; without it the
#                             guest console is an interactive shell (leave it to power off; ^A x quits QEMU)
#   --mem MIB                 guest memory (default 1024)
#   --smp N                   guest CPUs (default 2)
#   --queue-size N            virtqueue size (default 1024)
#   --num-request-queues N    virtio-fs request queues (default 1)
#   --tag TAG                 virtio-fs tag (default vhostfs)
#   --mount-opts OPTS         virtiofs mount options in the guest (e.g. dax=inode; with a DAX
#                             window the default is dax=always)
#   --dax-window-size SIZE    give the guest a DAX window of SIZE bytes (e.g. 64M, a multiple of 2M)
#                             served by vhostfs --dax-window-size; needs QEMU 11.1 (--stack forky),
#                             whose generic vhost-user device takes the window, the configuration
#                             space (tag) and the queues from the back end (vhost-user-fs-pci has no
#                             DAX window there)
#   --daemon-args 'ARGS'      more vhostfs options (e.g. '--record-vhost-user /tmp/session.txt')
#   --timeout SECONDS         give up on a --cmd run after this long (default 1800)
#   --daemon-cmd 'COMMAND'    serve with another daemon; {sock} and {dir} are replaced, e.g.
#                             '/usr/lib/qemu/virtiofsd --socket-path={sock} -o source={dir}'
#
# On a fresh Debian 12 machine (as root) it installs QEMU and the guest's build tools with apt, and
# vhostfs into the repository's .venv. Exit status: the guest command's, or 1 when the daemon or the
# guest failed (then the daemon log's path is printed).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/common.sh
. "$here/common.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

shared_dir=/var/tmp/vhostfs-share
cmd='' have_cmd=''
stack=debian12 mem=1024 smp=2 queue_size=1024 num_request_queues=1 tag=vhostfs mount_opts='' timeout=1800
daemon_cmd='' daemon_args='' dax_window_size=''
while [ $# -gt 0 ]; do
    case $1 in -h | --help) usage 0 ;; esac
    [ $# -ge 2 ] || { log "$1 needs a value"; usage 2; }
    case $1 in
        --shared-dir) shared_dir=$2 ;;
        --cmd) cmd=$2 have_cmd=1 ;;
        --stack) stack=$2 ;;
        --mem) mem=$2 ;;
        --smp) smp=$2 ;;
        --queue-size) queue_size=$2 ;;
        --num-request-queues) num_request_queues=$2 ;;
        --tag) tag=$2 ;;
        --mount-opts) mount_opts=$2 ;;
        --timeout) timeout=$2 ;;
        --daemon-cmd) daemon_cmd=$2 ;;
        --daemon-args) daemon_args=$2 ;;
        --dax-window-size) dax_window_size=$2 ;;
        *) log "unknown option $1"; usage 2 ;;
    esac
    shift 2
done

if [ -n "$dax_window_size" ] && [ "$stack" != forky ]; then
    log "--dax-window-size needs QEMU 11.1's shared memory regions: --stack forky"
    exit 2
fi

# It also installs QEMU when it is missing.
guest=$("$here/build-guest.sh" --stack "$stack") || { log "building the guest failed"; exit 1; }
read -r vmlinuz initrd qemu_bin <<<"$guest"

mkdir -p "$shared_dir"
shared_dir=$(cd "$shared_dir" && pwd)
run=$(mktemp -d "${TMPDIR:-/tmp}/vhostfs-run.XXXXXX")
sock=$run/vhostfs.sock
daemon_log=$run/daemon.log

if [ -n "$daemon_cmd" ]; then
    # Quote the substituted paths so that the command line survives directories with spaces.
    daemon_cmd=${daemon_cmd//\{sock\}/$(printf %q "$sock")}
    daemon_cmd=${daemon_cmd//\{dir\}/$(printf %q "$shared_dir")}
else
    python=$(ensure_venv "$repo")
    daemon_cmd="$(printf %q "$python") -m vhostfs --socket-path $(printf %q "$sock") --shared-dir $(printf %q "$shared_dir")"
    # The generic device reads the configuration space (the tag) from the back end.
    [ -z "$dax_window_size" ] || daemon_cmd+=" --tag $(printf %q "$tag") --dax-window-size $(printf %q "$dax_window_size")"
    [ -z "$daemon_args" ] || daemon_cmd+=" $daemon_args"
fi

daemon_pid=
stop_daemon() {
    [ -n "$daemon_pid" ] || return 0
    kill "$daemon_pid" 2>/dev/null || true
    # Give it a few seconds to exit cleanly before insisting.
    for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
}
failed() {
    log "$*"
    log "daemon log: $daemon_log"
    tail -n 20 "$daemon_log" >&2 || true
    exit 1
}
trap stop_daemon EXIT

log "starting: $daemon_cmd"
bash -c "exec $daemon_cmd" >"$daemon_log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do
    [ -S "$sock" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || failed "the daemon exited before creating $sock"
    sleep 0.05
done
[ -S "$sock" ] || failed "the daemon did not create $sock within 10 s"

if [ -n "$have_cmd" ]; then
    # The kernel unpacks every cpio archive concatenated in the initrd, so a second one adds /cmd.sh
    # to the base initramfs without rebuilding it.
    mkdir "$run/cmd"
    printf '%s\n' "$cmd" >"$run/cmd/cmd.sh"
    cp "$initrd" "$run/initrd.img"
    (cd "$run/cmd" && echo cmd.sh | cpio --quiet -o -H newc -R 0:0) | gzip >>"$run/initrd.img"
    initrd=$run/initrd.img
fi

device="vhost-user-fs-pci,chardev=vhostfs,tag=$tag,queue-size=$queue_size,num-request-queues=$num_request_queues"
if [ -n "$dax_window_size" ]; then
    # virtio-fs is device 26; its queues are the hiprio queue and the request queues, and its
    # configuration space is the 36-byte tag and the request queue count (virtio 1.2, 5.11.4).
    device="vhost-user-test-device-pci,chardev=vhostfs,virtio-id=26,num_vqs=$((1 + num_request_queues)),config_size=40,vq_size=$queue_size"
    mount_opts=${mount_opts:-dax=always}
fi

# shellcheck disable=SC2054 # the commas separate QEMU's sub-options, not array elements
qemu=(
    "$qemu_bin" -accel tcg -cpu max -smp "$smp" -m "$mem"
    # vhost-user needs guest RAM in a shareable memfd that the daemon can map.
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem
    -kernel "$vmlinuz" -initrd "$initrd"
    -append "console=ttyS0 quiet panic=-1 vhostfs.tag=$tag${mount_opts:+ vhostfs.opts=$mount_opts}"
    -chardev "socket,id=vhostfs,path=$sock"
    -device "$device"
    -display none -vga none -net none -no-reboot -pidfile "$run/qemu.pid"
)

# A guest whose daemon has died waits for its replies forever, so QEMU is stopped a little after the
# daemon exits (a little: some daemons exit by themselves once QEMU disconnects at power-off).
watch_daemon() {
    while kill -0 "$daemon_pid" 2>/dev/null; do sleep 1; done
    sleep 10
    if [ -s "$run/qemu.pid" ] && kill "$(cat "$run/qemu.pid")" 2>/dev/null; then
        log "stopped QEMU: the daemon exited while the guest was running"
    fi
}
watch_daemon &
watcher_pid=$!
trap 'kill "$watcher_pid" 2>/dev/null || true; stop_daemon' EXIT

if [ -z "$have_cmd" ]; then
    # The QEMU monitor shares the console: ^A c switches to it, ^A x quits.
    "${qemu[@]}" -serial mon:stdio || failed "qemu failed"
    stop_daemon
    rm -rf "$run"
    exit 0
fi

console=$run/console.log
# Strip the serial line's carriage returns so that the log can be grepped.
status=0
timeout "$timeout" "${qemu[@]}" -serial stdio -monitor none </dev/null | tr -d '\r' | tee "$console" || status=$?
[ "$status" = 0 ] || failed "qemu failed or timed out (status $status); console: $console"
stop_daemon

grep -q '^VHOSTFS-GUEST-MOUNTED' "$console" || failed "the guest did not mount the share; console: $console"
exit_line=$(grep -a '^VHOSTFS-GUEST-EXIT=' "$console" | tail -n 1 || true)
[ -n "$exit_line" ] || failed "the guest command did not finish; console: $console"
grep -q '^VHOSTFS-GUEST-UNMOUNTED' "$console" || failed "the guest could not unmount the share"
rm -rf "$run"
exit "${exit_line#VHOSTFS-GUEST-EXIT=}"
