# Helpers shared by the scripts in this directory. Source it; it is not meant to be run.
# shellcheck shell=bash

# Without this, a failing command inside $(...) would not stop the function it runs in.
shopt -s inherit_errexit

# Exit status that means "something this needs is missing and cannot be installed here" (not root,
# no apt-get, no network). The e2e harness turns it into a skip outside CI instead of a failure.
readonly VHOSTFS_EXIT_UNAVAILABLE=3

log() { echo "${0##*/}: $*" >&2; }

# apt_update: refreshes the package lists at most once per run (the flag is exported so that scripts
# called from this one skip the refresh too).
apt_update() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "cannot use apt-get here (run as root on Debian/Ubuntu)"
        return "$VHOSTFS_EXIT_UNAVAILABLE"
    fi
    [ -z "${VHOSTFS_APT_UPDATED:-}" ] || return 0
    apt-get update -qq || { log "apt-get update failed"; return "$VHOSTFS_EXIT_UNAVAILABLE"; }
    export VHOSTFS_APT_UPDATED=1
}

# apt_install PKG...: installs Debian packages.
apt_install() {
    log "installing $*"
    apt_update || return
    # Recommends would pull in QEMU's GUI and audio stack, which a serial-console guest never uses.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
        || { log "apt-get install $* failed"; return "$VHOSTFS_EXIT_UNAVAILABLE"; }
}

# running_in_ci: whether CI is set to something true (as tests/e2e/guest.py's running_in_ci reads it).
running_in_ci() {
    case "${CI:-}" in
        "" | 0 | [Ff][Aa][Ll][Ss][Ee] | [Nn][Oo]) return 1 ;;
        *) return 0 ;;
    esac
}

# install_needed PKG...: installs packages the tests need. Where that fails, CI (which must run those
# tests) stops with an error; elsewhere it goes on, and the tests that need them skip with the reason.
install_needed() {
    apt_install "$@" && return 0
    if running_in_ci; then
        log "CI=$CI: cannot install $*, which the tests need"
        exit 1
    fi
    log "continuing without $*; the tests that need them will say so"
}

# A dynamically linked busybox cannot run in the initramfs, which has no libc; `ldd` fails on
# static binaries, which is exactly the property wanted.
have_static_busybox() {
    local bb
    bb=$(command -v busybox) || return 1
    ! ldd "$bb" >/dev/null 2>&1
}

# ensure_guest_tools: what booting a guest needs on the host (building one needs the same set).
ensure_guest_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    have_static_busybox || missing+=(busybox-static)
    command -v depmod >/dev/null || missing+=(kmod)
    command -v cpio >/dev/null || missing+=(cpio)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# ensure_venv REPO [EXTRAS]: makes REPO/.venv hold an editable install of vhostfs (with the optional
# dependency group EXTRAS, e.g. "test") and prints the venv's python. pip runs only when the venv is
# missing, cannot import vhostfs, or was installed from another pyproject.toml/setup.py or without
# EXTRAS (an install with extras serves callers that want none, so run-qemu.sh and test.sh agree).
# The interpreter is the first python3 on PATH: pyenv's on a developer machine, /usr/bin/python3 on
# Debian, which needs python3-venv for ensurepip and python3-dev + gcc for vhostfs's cffi extension.
ensure_venv() {
    local repo=$1 extras=${2:-} venv=$1/.venv spec=$1 sources installed missing=()
    [ -z "$extras" ] || spec="${repo}[$extras]"
    sources=$(cat "$repo/pyproject.toml" "$repo/setup.py" | sha256sum | cut -d' ' -f1)
    installed=$(cat "$venv/.vhostfs-stamp" 2>/dev/null || true)
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import vhostfs' 2>/dev/null &&
        { [ "$installed" = "$sources $extras" ] || { [ -z "$extras" ] && [ "${installed%% *}" = "$sources" ]; }; }; then
        echo "$venv/bin/python"
        return 0
    fi
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_path("include") + "/Python.h")' \
        2>/dev/null || missing+=(python3-dev)
    command -v gcc >/dev/null || missing+=(gcc)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    log "installing $spec into $venv (log: $venv/pip.log)"
    # pip's build backend is chatty even with -q; its output matters only when it fails.
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
        "$venv/bin/python" -m pip install -q -e "$spec"; } >"$venv/pip.log" 2>&1; then
        tail -n 30 "$venv/pip.log" >&2
        log "pip install failed (log: $venv/pip.log)"
        return 1
    fi
    echo "$sources $extras" >"$venv/.vhostfs-stamp"
    echo "$venv/bin/python"
}
