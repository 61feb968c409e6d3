# Sourced by .ci/fresh-root and .ci/container: a clean Debian 12 root made with debootstrap, kept
# between runs in $RNNLM_CI_CACHE (a new machine makes it again: about a minute), and the mounts
# that make a copy of it usable with chroot.

RNNLM_CI_CACHE=${RNNLM_CI_CACHE:-/var/cache/rnnlm-ci}
PRISTINE=$RNNLM_CI_CACHE/bookworm-minbase

pristine_debian_root() {
    [[ -f $PRISTINE/.complete ]] && return
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    mkdir -p "$RNNLM_CI_CACHE"
    rm -rf "$PRISTINE.partial"
    echo "making a clean Debian 12 root with debootstrap (kept in $PRISTINE)" >&2
    debootstrap --variant=minbase bookworm "$PRISTINE.partial" >"$RNNLM_CI_CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$RNNLM_CI_CACHE/debootstrap.log" >&2; return 1; }
    rm -rf "$PRISTINE" && mv "$PRISTINE.partial" "$PRISTINE" && touch "$PRISTINE/.complete"
}

# fresh_copy DIR — a throwaway copy of the clean root, with this machine's DNS settings, its
# certificate authority (the registries are reached through it) and its local wheel folder.
fresh_copy() {
    local root=$1
    pristine_debian_root
    cp -a "$PRISTINE/." "$root/"
    rm -f "$root/.complete"
    # A machine's own name and localhost resolve on any installed system (torchrun's rendezvous
    # needs them); debootstrap leaves /etc/hosts to the installer, so it comes from this machine.
    cp /etc/resolv.conf /etc/hosts /etc/hostname "$root/etc/"
    mkdir -p "$root/etc/rnnlm-ci" "$root/opt/wheels"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/rnnlm-ci/ca-bundle.crt"
}

mount_for_chroot() {
    local root=$1
    # The root a mount point of its own, as / is on a booted system: `ip -n` (network namespaces)
    # remounts / as a slave, which fails on a plain directory.
    mount --bind "$root" "$root" && mount --make-private "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
    mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
    mount -t tmpfs tmpfs "$root/dev/shm"
    mount -t tmpfs tmpfs "$root/tmp"
    [[ -d /opt/wheels ]] && mount --bind -o ro /opt/wheels "$root/opt/wheels"
    return 0
}

unmount_chroot() {
    local root=$1
    umount -R "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/opt/wheels" 2>/dev/null || true
    # anything a test mounted inside (tmpfs for disk-full tests, network namespaces)
    grep -o " $root[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    umount -R "$root" 2>/dev/null || true
}
