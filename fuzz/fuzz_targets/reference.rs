//! `reference::Reference::parse` on arbitrary text (lossy UTF-8). On success the
//! normalised form must round-trip: parsing `full_string()` gives an equal `Reference`
//! (and the same `full_string()`). `familiar_name`/`familiar_string` must not panic.
#![no_main]

use layerboot_init::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(r) = Reference::parse(&text) else { return };
    let _ = r.familiar_name();
    let _ = r.familiar_string();
    let full = r.full_string();
    match Reference::parse(&full) {
        Ok(again) => assert_eq!(again, r, "{text:?} → {full:?} parses to something else"),
        Err(e) => panic!("{text:?} parses, but its full_string {full:?} does not: {e}"),
    }
});
