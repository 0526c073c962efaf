//! GRUB's environment block (`grub-editenv`'s file): exactly 1024 bytes, a header line,
//! `name=value` lines, `#` padding. GRUB's `save_env` rewrites it in place, so it must
//! keep its size. layerboot keeps each deployment's tries in one of its own on the ESP
//! and only ever writes plain names and values (no escapes), which GRUB reads as is.

use crate::error::{Error, Result};

pub const SIZE: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

/// A name or value layerboot writes: letters, digits, `_`, `-`, `.`.
fn plain(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The variables of a block. Lines layerboot would not write (escapes, other tools'
/// values) are kept as they are, so a rewrite loses nothing of anyone else's.
pub fn parse(block: &[u8]) -> Result<Vec<(String, String)>> {
    if block.len() != SIZE || !block.starts_with(HEADER.as_bytes()) {
        return Err(Error::new(format!(
            "not a GRUB environment block ({} bytes; one is {SIZE} bytes starting '# GRUB Environment Block')",
            block.len()
        )));
    }
    let text = String::from_utf8_lossy(&block[HEADER.len()..]);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The block holding `vars`, padded to its size; refuses what does not fit.
pub fn render(vars: &[(String, String)]) -> Result<Vec<u8>> {
    let mut out = HEADER.as_bytes().to_vec();
    for (k, v) in vars {
        if !plain(k) || v.contains('\n') {
            return Err(Error::new(format!(
                "GRUB environment variable '{k}' cannot be written as is"
            )));
        }
        out.extend(format!("{k}={v}\n").as_bytes());
    }
    if out.len() > SIZE {
        return Err(Error::new(format!(
            "the GRUB environment block would need {} bytes of its {SIZE} (fix: `layerboot gc` fewer deployments)",
            out.len()
        )));
    }
    out.resize(SIZE, b'#');
    Ok(out)
}

/// Overwrites the block at `path` in place, as GRUB's save_env does (FAT has no
/// atomic replace; a block of two sectors rewritten where it lies is the safest write
/// there is). `Ok(false)`: there is no block of the right size to overwrite.
pub fn rewrite_in_place(path: &std::path::Path, block: &[u8]) -> Result<bool> {
    use std::io::Write;
    match std::fs::metadata(path) {
        Ok(m) if m.len() == SIZE as u64 && block.len() == SIZE => {}
        _ => return Ok(false),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    f.write_all(block)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("cannot write", path, e))?;
    Ok(true)
}

/// Sets `name` to `value` in `vars` (added at the end if new).
pub fn set(vars: &mut Vec<(String, String)>, name: &str, value: &str) {
    match vars.iter_mut().find(|(k, _)| k == name) {
        Some(entry) => entry.1 = value.to_string(),
        None => vars.push((name.to_string(), value.to_string())),
    }
}

pub fn get<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `lb_<id12>`: the variable holding a deployment's state (`good`, or tries left).
pub fn tries_variable(short_id: &str) -> Option<String> {
    plain(short_id).then(|| format!("lb_{short_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_round_trips_at_its_size_and_keeps_others_lines() {
        let mut vars = vec![("saved_entry".to_string(), "0".to_string())];
        set(&mut vars, "lb_abc", "3");
        set(&mut vars, "lb_abc", "good");
        let block = render(&vars).unwrap();
        assert_eq!(block.len(), SIZE);
        assert!(block.starts_with(b"# GRUB Environment Block\nsaved_entry=0\nlb_abc=good\n#"));
        assert_eq!(parse(&block).unwrap(), vars);
        assert_eq!(get(&vars, "lb_abc"), Some("good"));
    }

    #[test]
    fn a_block_that_is_not_one_or_would_overflow_is_refused() {
        assert!(parse(b"# GRUB Environment Block\n").is_err(), "short");
        assert!(parse(&[b'#'; SIZE]).is_err(), "no header");
        let many: Vec<(String, String)> = (0..80).map(|i| (format!("lb_{i:012}"), "good".into())).collect();
        assert!(render(&many).unwrap_err().to_string().contains("fix:"));
        assert!(render(&[("a=b".into(), "1".into())]).is_err());
        assert_eq!(tries_variable("../x"), None);
    }
}
