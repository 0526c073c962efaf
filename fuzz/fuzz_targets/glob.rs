//! `kmod::glob_match` against glibc's `fnmatch(pattern, text, 0)`, which its doc comment
//! says it is ("fnmatch(3) without flags"), for ASCII pattern and text without NUL.
//! Input: pattern, a NUL byte, text. A disagreement panics with both strings.
//!
//! Restricted to the subset the doc comment names (`*`, `?` and `[...]` bracket
//! expressions, as modules.alias uses): patterns holding a backslash (fnmatch's escape)
//! or a `[:`, `[=` or `[.` (named classes, equivalence classes, collating symbols inside
//! brackets) are skipped, since glob_match does not claim to support those. So are
//! patterns where glibc itself departs from POSIX: an unterminated bracket expression
//! that ends in a range without its end (`[a-`, `*[]-`) is "no match" in glibc, while
//! POSIX, musl (the libc /init is linked with) and glob_match take the `[` literally.
#![no_main]

use std::ffi::CString;

use layerboot_init::kmod::glob_match;
use libfuzzer_sys::fuzz_target;

fn in_documented_subset(pattern: &str) -> bool {
    !pattern.contains('\\') && !["[:", "[=", "[."].iter().any(|s| pattern.contains(s)) && !glibc_unterminated_range(pattern.as_bytes())
}

/// Whether the first unterminated bracket expression (POSIX: `[`, an optional `!` or `^`,
/// an optional leading `]`, up to the next `]`) runs to the end of the pattern with
/// at least two characters, the last a `-`: glibc reads a range whose end is the NUL.
fn glibc_unterminated_range(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        if p[i] != b'[' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if matches!(p.get(j), Some(b'!' | b'^')) {
            j += 1;
        }
        let content = j;
        if p.get(j) == Some(&b']') {
            j += 1;
        }
        match p[j..].iter().position(|&b| b == b']') {
            Some(k) => i = j + k + 1,
            None => return p.len() - content >= 2 && p.ends_with(b"-"),
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|&b| b == 0) else { return };
    let (pattern, text) = (&data[..split], &data[split + 1..]);
    if !pattern.is_ascii() || !text.is_ascii() || text.contains(&0) {
        return;
    }
    let (pattern, text) = (std::str::from_utf8(pattern).unwrap(), std::str::from_utf8(text).unwrap());
    if !in_documented_subset(pattern) {
        return;
    }
    let ours = glob_match(pattern, text);
    let (p, t) = (CString::new(pattern).unwrap(), CString::new(text).unwrap());
    // SAFETY: two NUL-terminated strings that outlive the call.
    let libc = unsafe { libc::fnmatch(p.as_ptr(), t.as_ptr(), 0) };
    assert!(libc == 0 || libc == libc::FNM_NOMATCH, "fnmatch({pattern:?}, {text:?}) failed: {libc}");
    assert_eq!(ours, libc == 0, "glob_match({pattern:?}, {text:?}) = {ours}, fnmatch says {}", libc == 0);
});
