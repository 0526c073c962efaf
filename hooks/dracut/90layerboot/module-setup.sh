#!/bin/bash
# dracut module (/usr/lib/dracut/modules.d/90layerboot/): packs the static layerboot-init,
# the filesystems it mounts, /etc/layerboot.json and the old hook's /etc/docker-btrfs.json
# if there are; its mount hook makes the image's fresh writable root at $NEWROOT, and
# dracut switches to it. Ask for it with
# `dracut -a layerboot` (or add_dracutmodules+=" layerboot " in dracut.conf.d).
#
# For dracut's shell-script init: with its systemd modules the root is mounted by
# sysroot.mount from root= before any mount hook runs, so build with
# --omit "systemd systemd-initrd dracut-systemd".

check() {
    # Only when asked for.
    return 255
}

depends() {
    echo rootfs-block
    return 0
}

installkernel() {
    hostonly='' instmods btrfs overlay ext4 xfs vfat
}

# shellcheck disable=SC2154 # moddir: set by dracut
install() {
    inst_simple "${LAYERBOOT_INIT:-/usr/lib/layerboot/layerboot-init}" /usr/lib/layerboot/layerboot-init
    # shellcheck disable=SC2154 # dracutsysrootdir: set by dracut
    # Its defaults, and for mkinitcpio-docker-hooks' users the image their config names.
    local config
    for config in /etc/layerboot.json /etc/docker-btrfs.json; do
        if [[ -f $dracutsysrootdir$config ]]; then
            inst_simple "$config"
        fi
    done
    inst_hook mount 01 "$moddir/mount-layerboot.sh"
}
