#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/ (read-only second corpus dirs that
bench/fuzz.sh hands to libFuzzer): one well-formed example per format, so the fuzzer
starts from inputs that pass the magic numbers and checksums it could not guess.
Run from anywhere: python3 fuzz/seeds/make_seeds.py. Layouts follow each target's doc comment."""
import hashlib, json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def hexid(n):
    return ("%02x" % n) * 32


# ---- bolt: control byte, then a bbolt file (page size 1024) -------------------------
PS, MAGIC = 1024, 0xED0CDAED
BRANCH, LEAF, META = 1, 2, 4


def fnv1a64(b):
    h = 0xcbf29ce484222325
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def page_image(flags, elems):
    """elems: leaf (flags, key, value) or branch (child, key, b'')."""
    hdr = bytearray(16 + 16 * len(elems))
    struct.pack_into("<HH", hdr, 8, flags, len(elems))
    tail = b""
    for i, (f, k, v) in enumerate(elems):
        at = 16 + 16 * i
        pos = len(hdr) - at + len(tail)
        if flags == LEAF:
            struct.pack_into("<IIII", hdr, at, f, pos, len(k), len(v))
        else:
            struct.pack_into("<IIQ", hdr, at, pos, len(k), f)
        tail += k + v
    return bytes(hdr) + tail


def bolt(pages):
    n = max(pages) + 1
    data = bytearray(PS * n)
    for meta_page, txid in ((0, 7), (1, 6)):
        at = meta_page * PS
        struct.pack_into("<QH", data, at, meta_page, META)
        m = bytearray(64)
        struct.pack_into("<IIIIQQQQQ", m, 0, MAGIC, 2, PS, 0, 2, 0, 0xFFFFFFFFFFFFFFFF, 0, txid)
        struct.pack_into("<Q", m, 56, fnv1a64(m[:56]))
        data[at + 16:at + 80] = m
    for pid, img in pages.items():
        assert len(img) <= PS
        data[pid * PS:pid * PS + len(img)] = img
    return bytes(data)


def inline_bucket(elems):
    return bytes(16) + page_image(LEAF, elems)


nested = inline_bucket([(0, b"id", b"\xac\x02"), (0, b"kind", b"\x03")])
put("bolt", "sample", b"\x00" + bolt({
    2: page_image(BRANCH, [(3, b"a", b""), (4, b"v1", b"")]),
    3: page_image(LEAF, [(0, b"a", b"1"), (0, b"b", b"2")]),
    4: page_image(LEAF, [(1, b"v1", nested), (0, b"zz", b"last")]),
}))
# containerd's shape: v1/moby/images/<name>/target/digest, buckets on their own pages.
target = inline_bucket([(0, b"digest", b"sha256:" + hexid(0xab).encode()), (0, b"mediatype", b"x")])
put("bolt", "containerd", b"\x01" + bolt({
    2: page_image(LEAF, [(1, b"v1", struct.pack("<QQ", 3, 0))]),
    3: page_image(LEAF, [(1, b"moby", struct.pack("<QQ", 4, 0))]),
    4: page_image(LEAF, [(1, b"images", struct.pack("<QQ", 5, 0))]),
    5: page_image(LEAF, [(1, b"docker.io/library/x:latest", inline_bucket([(1, b"target", target)]))]),
}))

# ---- probe: control byte, then a disk -----------------------------------------------
def gpt(sector):
    disk = bytearray(sector * 3)  # the entry array must lie inside whole sectors
    disk[446 + 4] = 0xEE
    disk[510:512] = b"\x55\xaa"
    array = bytearray(4 * 128)
    array[0:16] = bytes(range(1, 17))  # type GUID
    array[16:32] = bytes(range(0x20, 0x30))  # unique GUID
    name = "store".encode("utf-16-le")
    array[56:56 + len(name)] = name
    h = bytearray(92)
    h[0:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ", h, 8, 0x10000, 92, 0, 0, 1, 0, 34, 0)
    struct.pack_into("<QIII", h, 72, 2, 4, 128, zlib.crc32(array))
    struct.pack_into("<I", h, 16, zlib.crc32(h))
    disk[sector:sector + 92] = h
    disk[2 * sector:2 * sector + len(array)] = array
    return bytes(disk)


put("probe", "gpt512", b"\x00" + gpt(512))
put("probe", "gpt4096", b"\x00" + gpt(4096))
mbr = bytearray(512)
mbr[440:444] = b"\x78\x56\x34\x12"
mbr[510:512] = b"\x55\xaa"
put("probe", "mbr", b"\x00" + bytes(mbr))
ext4 = bytearray(0x488)
ext4[0x438:0x43a] = b"\x53\xef"
ext4[0x468:0x478] = bytes(range(16))
ext4[0x478:0x47d] = b"store"
put("probe", "ext4", b"\x00" + bytes(ext4))
xfs = bytearray(120)
xfs[0:4] = b"XFSB"
xfs[32:48] = bytes(range(16))
xfs[108:113] = b"store"
put("probe", "xfs", b"\x00" + bytes(xfs))
vfat = bytearray(512)
vfat[0x52:0x5a] = b"FAT32   "
vfat[0x43:0x47] = b"\x78\x56\x34\x12"
vfat[0x47:0x52] = b"STORE      "
vfat[510:512] = b"\x55\xaa"
put("probe", "vfat", b"\x00" + bytes(vfat))
btrfs = bytearray(0x12b + 256)
btrfs[0x20:0x30] = bytes(range(16))
btrfs[0x40:0x48] = b"_BHRfS_M"
btrfs[0x88:0x90] = struct.pack("<Q", 2)
btrfs[0x12b:0x130] = b"store"
put("probe", "btrfs", b"\x01" + bytes(btrfs))  # bit 0: placed at 64 KiB

# ---- text targets ---------------------------------------------------------------------
put("cmdline", "hooks", "root=UUID=ABCD-1 rw rootflags=subvol=docker_rw,compress=zstd docker_path=var/lib/docker "
    "toplayer=LABEL=top toplayerflags=ro toplayer_path=/hosts/pc1 docker_image=arch:desktop")
put("cmdline", "layerboot", 'root=/dev/vda docker_image=x:2 init=/bin/sh rootwait "layerboot.rw=a" layerboot.keep=3 '
    "layerboot.mode=keep layerboot.upper=tmpfs layerboot.modules=nvme,xhci_pci layerboot.namespace=k8s.io "
    "layerboot.timeout=10 layerboot.rescue_timeout=5 layerboot.debug ro")
config = json.dumps({"kernel": "6.1.0", "modules": ["nvme"], "defaults": {"docker_image": "baked:1", "root": "LABEL=x", "docker_path": "/srv/docker/"}})
put("cmdline", "config", config)
put("cmdline", "both", "root=PARTUUID=abc rootwait\0" + config)

for i, r in enumerate(["debian", "docker.io/library/debian:latest", "index.docker.io/acc/x:1", "localhost:5000/x/y:t",
                       "ghcr.io/o/r@sha256:" + hexid(0xab), "acc/x:9@sha256:" + hexid(0xcd), "a__b-c.d/e--f:v1.0_x"]):
    put("reference", "r%d" % i, r)

DEP = ("kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/raid6/raid6_pq.ko kernel/lib/libcrc32c.ko\n"
       "kernel/crypto/xor.ko:\nkernel/lib/raid6/raid6_pq.ko:\nkernel/lib/libcrc32c.ko:\nkernel/crypto/crc32c_generic.ko:\n"
       "kernel/arch/x86/crypto/crc32c-intel.ko:\n"
       "kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
       "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n")
SOFT = "# comment\nsoftdep btrfs pre: crypto-crc32c\nsoftdep libcrc32c pre: crc32c post: virtio\n"
ALIAS = ("alias crypto-crc32c crc32c_intel\nalias crc32c crc32c_intel\nalias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel\n"
         "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias virtio:d00000002v* virtio_blk\nalias ?ci:v1234* xor\n")
put("kmod", "debian", b"\xff".join(x.encode() for x in (DEP, SOFT, ALIAS, "kernel/fs/ext4/ext4.ko\n")))

for i, (p, t) in enumerate([("pci:v00008086d*sv*", "pci:v00008086d00001234sv0000"), ("a?c", "abc"), ("[a-c]x", "bx"),
                            ("[!a-c]x", "bx"), ("a*b*c", "aXbYc"), ("acpi*:PNP0A03:*", "acpi:PNP0A03:"),
                            ("[]a]*", "]"), ("[^x-]?", "-z"), ("ab[", "ab[")]):
    put("glob", "g%d" % i, p + "\0" + t)

put("uevent", "add", "add@/devices/pci0000:00/0000:00:01.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:01.0\0"
    "SUBSYSTEM=pci\0MODALIAS=pci:v00008086d00001234sv00000000sd00000000bc01sc06i01\0SEQNUM=1234")

# ---- store_json: control byte, then parts separated by 0xFF ---------------------------
diffs = ["sha256:" + hexid(1), "sha256:" + hexid(2)]
repos = json.dumps({"Repositories": {"debian": {"debian:latest": "@ID@"}, "acc/x": {"acc/x@sha256:" + hexid(0xdd): "@ID@"}}})
cfg = json.dumps({"architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": diffs}})
docker = b"\xff".join(x.encode() for x in (repos, cfg, "debian", "L1ABC"))
put("store_json", "docker_overlay2", b"\x08" + docker)
put("store_json", "docker_btrfs", b"\x0a" + docker)
put("store_json", "docker_vfs_bad_diff", b"\x1c" + docker)
images = json.dumps([{"id": hexid(0xaa), "names": ["localhost/app:latest", "docker.io/library/app:1"], "layer": hexid(0x12)}])
layers = json.dumps([{"id": hexid(0x12), "parent": hexid(0x11)}, {"id": hexid(0x11), "flags": {"incomplete": False}}])
podman = b"\xff".join(x.encode() for x in (images, layers, "app", "L1ABC"))
put("store_json", "podman_overlay", b"\x09" + podman)
put("store_json", "podman_btrfs", b"\x0b" + podman)
