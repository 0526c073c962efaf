#!/bin/sh
# shellcheck disable=SC2154 # NEWROOT: set by dracut's init
# dracut mount hook: layerboot-init makes the image's fresh writable root at $NEWROOT
# (root= names the partition holding the image store); dracut then switches to it.
# shellcheck source=/dev/null # dracut's own
type die >/dev/null 2>&1 || . /lib/dracut-lib.sh

if ! ismounted "$NEWROOT"; then
    info "layerboot: making the root from the container image"
    /usr/lib/layerboot/layerboot-init --mount-root "$NEWROOT" \
        || die "layerboot could not make the root filesystem (the reason is above)"
fi
