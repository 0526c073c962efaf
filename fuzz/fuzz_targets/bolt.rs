//! `bolt::Db::from_bytes` on arbitrary bytes, then a bounded walk of what it finds
//! (`root`, `entries`, `get`, `value`, `bucket`, nested buckets a few levels down).
//! Any `Err` is fine; a panic, or a walk that does not finish, is a bug in the reader.
//!
//! Input: one control byte, then the file. Control bit 0 rewrites the FNV-1a checksums
//! of the meta pages (at 0 and one page in) so the fuzzer gets past them; with the bit
//! clear, torn meta pages are exercised as they come.
#![no_main]

use std::path::Path;

use layerboot_init::bolt::{Bucket, Db, Item};
use libfuzzer_sys::fuzz_target;

const PAGE_HEADER: usize = 16;

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn fix_meta(data: &mut [u8], offset: usize) {
    if let Some(m) = data.get_mut(offset + PAGE_HEADER..offset + PAGE_HEADER + 64) {
        let sum = fnv1a64(&m[..56]);
        m[56..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Walks at most `budget` buckets, `depth` levels down.
fn walk(b: &Bucket<'_>, depth: usize, budget: &mut usize) {
    if depth > 4 || *budget == 0 {
        return;
    }
    *budget -= 1;
    let _ = b.get(b"");
    let _ = b.value("v1");
    let _ = b.bucket("v1");
    let Ok(entries) = b.entries() else { return };
    for (key, entry) in entries.iter().take(16) {
        let _ = b.get(key);
        if let Ok(k) = std::str::from_utf8(key) {
            let _ = b.value(k);
            let _ = b.bucket(k);
        }
        if let Item::Bucket(nested) = entry {
            walk(nested, depth + 1, budget);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, file)) = data.split_first() else { return };
    let mut file = file.to_vec();
    if control & 1 != 0 {
        fix_meta(&mut file, 0);
        let ps = file.get(PAGE_HEADER + 8..PAGE_HEADER + 12).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
        for offset in [ps, 1024, 4096] {
            if offset >= 1024 {
                fix_meta(&mut file, offset);
            }
        }
    }
    let Ok(db) = Db::from_bytes(Path::new("fuzz.db"), file) else { return };
    walk(&db.root(), 0, &mut 64);
});
