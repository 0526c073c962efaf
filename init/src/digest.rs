//! Content IDs: validation before an ID read from disk becomes part of a path, and sha256.

use sha2::{Digest, Sha256};

/// 64 lowercase hex digits: the only shape an ID may have before it is joined to a path
/// (so `../../etc` or a truncated file can never name another directory).
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `sha256:<hex>` → `<hex>`, if well formed.
pub fn sha256_hex(id: &str) -> Option<&str> {
    id.strip_prefix("sha256:").filter(|h| is_hex64(h))
}

pub fn sha256_of(data: &[u8]) -> String {
    let sum = Sha256::digest(data);
    sum.iter().map(|b| format!("{b:02x}")).collect()
}

/// OCI chain IDs: `C0 = D0`, `Cn = sha256(C(n-1) + " " + Dn)`, all as `sha256:<hex>`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{}", sha256_of(format!("{prev} {d}").as_bytes())),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex64_rejects_everything_but_lowercase_hex() {
        assert!(is_hex64(&"0a".repeat(32)));
        assert!(!is_hex64(&"0A".repeat(32)));
        assert!(!is_hex64(&"0a".repeat(31)));
        assert!(!is_hex64(&format!("../{}", "a".repeat(61))));
    }

    #[test]
    fn chain_id_of_two_layers() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        // printf '%s %s' "$a" "$b" | sha256sum
        assert_eq!(
            c[1],
            "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
        );
        assert_eq!(
            sha256_of(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
