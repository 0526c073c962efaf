//! Superblock and partition-table parsing on arbitrary disk bytes:
//! `probe::probe_bytes` and `probe::partition_ids` (partitions 1–4, 512- and
//! 4096-byte sectors). Every answer is fine; a panic is a bug.
//!
//! Input: one control byte, then the disk. Bit 0 places the disk bytes at 64 KiB (where
//! btrfs keeps its superblock) after zeros, so short inputs reach it; bit 1 rewrites the
//! GPT header's and entry array's CRC32s (for the sector size being tried) so the fuzzer
//! gets past them.
#![no_main]

use layerboot_init::probe::{partition_ids, probe_bytes};
use libfuzzer_sys::fuzz_target;

/// Sets the GPT entry-array CRC, then the header CRC, where the header says they are.
fn fix_gpt(disk: &mut [u8], sector: usize) {
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let Some(hdr) = disk.get(sector..sector + 92) else { return };
    let header_size = le32(hdr, 12) as usize;
    let array_lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let array_bytes = u64::from(le32(hdr, 80)) * u64::from(le32(hdr, 84));
    let array_start = array_lba.checked_mul(sector as u64).and_then(|s| usize::try_from(s).ok());
    if let Some(array) = array_start.and_then(|s| disk.get(s..s.checked_add(array_bytes as usize)?)) {
        let crc = crc32fast::hash(array);
        disk[sector + 88..sector + 92].copy_from_slice(&crc.to_le_bytes());
    }
    if (92..=sector).contains(&header_size) && sector + header_size <= disk.len() {
        let mut h = disk[sector..sector + header_size].to_vec();
        h[16..20].fill(0);
        let crc = crc32fast::hash(&h);
        disk[sector + 16..sector + 20].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let disk = if control & 1 != 0 {
        let mut d = vec![0u8; 0x10000];
        d.extend_from_slice(rest);
        d
    } else {
        rest.to_vec()
    };
    let _ = probe_bytes(&disk);
    for sector in [512u64, 4096] {
        let mut disk = disk.clone();
        if control & 2 != 0 {
            fix_gpt(&mut disk, sector as usize);
        }
        for n in 1..=4 {
            let _ = partition_ids(&disk[..], n, sector);
        }
    }
});
