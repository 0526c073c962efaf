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

# ---- the ESP as the bless service and the builder read it -----------------------------
# Each as layerboot writes it: grubenv.rs `render`, systemd_boot.rs `render` (commands.rs
# `entry_text`'s arguments), serde_json's pretty `Record`.
ESP_ID = "sha256:abcdefabcdef0123456789012345678901234567890123456789012345678901"
ESP_OTHER = "sha256:abcdefabcdef0123456789012345678901234567890123456789012345678902"
ESP_NAME = "abcdefabcdef"


def grubenv(pairs):
    b = ("# GRUB Environment Block\n" + "".join("%s=%s\n" % kv for kv in pairs)).encode()
    assert len(b) <= 1024
    return b + b"#" * (1024 - len(b))


# grubenv: control byte (bit 0: the input is the whole file), then text
put("grubenv", "layerboot", b"\x01" + grubenv([("lb_abcdefabcdef", "good"), ("lb_0123456789ab", "2")]))
put("grubenv", "editenv", b"\x02saved_entry=gnulinux-advanced\nx=a\\\nb\nback=c\\\\\n# a comment\nlb_abcdefabcdef=3\nlb_cut=1")
put("grubenv", "full", b"\x09" + grubenv([("lb_%012x" % i, "good") for i in range(45)]))


def entry(image_id, title, serial, options, marker=True):
    k, i = "/layerboot/%s/vmlinuz" % ESP_NAME, "/layerboot/%s/initramfs.img" % ESP_NAME
    text = "title %s\nsort-key layerboot\nversion %06d\nlinux %s\ninitrd %s\noptions %s\n" % (title, serial, k, i, options)
    return ("# written by layerboot deploy for %s\n" % image_id if marker else "") + text


OPTIONS = "root=LABEL=s rw docker_image=" + ESP_ID
TITLE = "layerboot: demo (%s, kernel 6.1.0)" % ESP_NAME
# entry: control byte (bit 0: through `list` on an ESP; bit 1: the largest serial), then the text
put("entry", "layerboot", b"\x01" + entry(ESP_ID, TITLE, 1, OPTIONS).encode())
put("entry", "before_marker", b"\x01" + entry(ESP_ID, TITLE, 3, OPTIONS, marker=False).encode())
put("entry", "other_image", b"\x03" + entry(ESP_OTHER, TITLE, 9, OPTIONS + " init=/bin/sh").encode())
put("entry", "crlf", b"\x00" + entry(ESP_ID, TITLE, 12, OPTIONS).replace("\n", "\r\n").encode())

# entry_name: a file name, a loader path, or LoaderBootCountPath's raw bytes
for n, name in enumerate(["layerboot-000001-%s+3.conf" % ESP_NAME, "layerboot-000002-%s0123+2-1.conf" % ESP_NAME,
                          "layerboot-000003-%s+0-3.conf" % ESP_NAME, "layerboot-000004-%s.conf" % ESP_NAME,
                          "debian-12+3-0.conf"]):
    put("entry_name", "n%d" % n, name)
put("entry_name", "loader_path", "\\loader\\entries\\layerboot-000002-%s+2-1.conf" % ESP_NAME)
put("entry_name", "efi_variable", b"\x07\x00\x00\x00"
    + ("\\loader\\entries\\layerboot-000001-%s+3.conf" % ESP_NAME).encode("utf-16-le") + b"\x00\x00")


def record(**kw):
    r = {"reference": "demo", "image_id": ESP_ID, "kernel": "6.1.0", "serial": 1, "created": 1700000000,
         "store": "/var/lib/docker", "namespace": None, "options": OPTIONS, "initramfs_args": [], "tries": 3,
         "loader": "systemd-boot"}
    r.update(kw)
    return (json.dumps(r, indent=2) + "\n").encode()


SUM = {"size": 4, "sha256": "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"}
# deployment_record: the JSON, then 0xFF, the directory's name, 0xFF, its grubenv value
put("deployment_record", "systemd_boot", record(files={"vmlinuz": SUM, "initramfs": SUM}) + b"\xff" + ESP_NAME.encode())
put("deployment_record", "grub", record(loader="grub", serial=7, tries=16, namespace="moby",
                                        initramfs_args=["--module", "virtio_blk"],
                                        options=OPTIONS + " console=ttyS0,115200 a|b x<y&z")
    + b"\xff" + ESP_NAME.encode() + b"\xff2")
put("deployment_record", "longer_name", record(tries=0, serial=18446744073709551615) + b"\xff" + ESP_NAME.encode() + b"0123")
put("deployment_record", "before_files", json.dumps({k: v for k, v in json.loads(record()).items() if k != "loader"}).encode())
