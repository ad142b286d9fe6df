#!/usr/bin/env bash
# Builds the snapvm Linux guest: a minimal kernel from Debian's
# linux-source-6.1 (tinyconfig + snapvm.config + patches/), a busybox
# initramfs with ./init, and an ext4 disk image. Results are cached in
# $SNAPVM_LINUX_CACHE (default: <repo>/target/linux-guest); a second run with
# the same inputs does nothing. Prints the output directory on success.
#
# Outputs: vmlinux (PVH ELF), initramfs.cpio (uncompressed: no decompression
# in emulated ring 0), disk.ext4 (64 MiB, empty ext4).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${SNAPVM_LINUX_CACHE:-$repo/target/linux-guest}
out=$cache/out
mkdir -p "$cache" "$out"

inputs_hash=$(cat "$0" "$here/snapvm.config" "$here/init" "$here"/patches/*.patch | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$inputs_hash" ] &&
   [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ] && [ -f "$out/disk.ext4" ]; then
    echo "$out"
    exit 0
fi

log() { echo "linux-guest: $*" >&2; }

need=()
[ -f /usr/src/linux-source-6.1.tar.xz ] || need+=(linux-source-6.1)
for tool in gcc make flex bison bc cpio mkfs.ext4 xz; do
    command -v $tool >/dev/null || case $tool in
        mkfs.ext4) need+=(e2fsprogs) ;;
        xz) need+=(xz-utils) ;;
        *) need+=($tool) ;;
    esac
done
[ -x /bin/busybox ] || need+=(busybox-static)
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

src=$cache/linux-source-6.1
if [ ! -f "$src/.snapvm-patched" ]; then
    log "unpacking linux-source-6.1"
    rm -rf "$src"
    tar -C "$cache" -xf /usr/src/linux-source-6.1.tar.xz
    for p in "$here"/patches/*.patch; do
        log "applying $(basename "$p")"
        patch -s -p1 -d "$src" < "$p"
    done
    touch "$src/.snapvm-patched"
fi

log "configuring"
make -s -C "$src" tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/snapvm.config" >/dev/null 2>&1
make -s -C "$src" olddefconfig >/dev/null
# Every option of the fragment must have survived dependency resolution.
missing=0
while read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qx "$line" "$src/.config" || { log "config lost: $line"; missing=1; } ;;
        "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
            if grep -q "^$opt=" "$src/.config"; then log "config still set: $opt"; missing=1; fi ;;
    esac
done < "$here/snapvm.config"
[ $missing -eq 0 ] || { log "configuration does not match snapvm.config"; exit 1; }

log "building vmlinux (a few minutes)"
make -s -C "$src" -j"$(nproc)" vmlinux >/dev/null
cp "$src/vmlinux" "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"

log "building the initramfs"
root=$cache/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,etc}
cp /bin/busybox "$root/bin/busybox"
for app in sh mount umount mkdir cat echo grep sync reboot sleep ls \
           ip ping wget sha256sum cut; do
    ln -sf busybox "$root/bin/$app"
done
ln -sf ../bin/busybox "$root/sbin/reboot"
install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"

log "building the ext4 disk"
rm -f "$out/disk.ext4.tmp"
truncate -s 64M "$out/disk.ext4.tmp"
mkfs.ext4 -q -F -L snapvm "$out/disk.ext4.tmp"
mv "$out/disk.ext4.tmp" "$out/disk.ext4"

echo "$inputs_hash" > "$out/.stamp"
echo "$out"
