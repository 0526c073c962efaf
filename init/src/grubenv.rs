//! GRUB's environment block (`grub-editenv`'s file): exactly 1024 bytes, a header line,
//! `name=value` lines, `#` padding. GRUB's `save_env` rewrites it in place, so it must
//! keep its size. layerboot keeps each deployment's tries in one of its own on the ESP
//! and only ever writes plain names and values (no escapes), which GRUB reads as is;
//! anything else in the block is read as GRUB reads it and written back as it was.

use crate::error::{Error, Result};

pub const SIZE: usize = 1024;
const HEADER: &str = "# GRUB Environment Block\n";

/// A name or value layerboot writes: letters, digits, `_`, `-`, `.`.
fn plain(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The variables of a block, read as GRUB reads them (grub-core/lib/envblk.c): a line
/// starting with `#` is a comment; a value runs to the first newline no backslash escapes
/// (`grub-editenv` writes a newline in a value as `\` and a newline); a record with no
/// end (cut short by the padding) is no variable. Values are kept as written, escapes and
/// all, so a rewrite gives back every other tool's variable byte for byte.
pub fn parse(block: &[u8]) -> Result<Vec<(String, String)>> {
    if block.len() != SIZE || !block.starts_with(HEADER.as_bytes()) {
        let size = match block.len() {
            n if n > SIZE => format!("more than {SIZE} bytes"),
            n => format!("{n} bytes"),
        };
        return Err(Error::new(format!(
            "not a GRUB environment block ({size}; one is {SIZE} bytes starting '# GRUB Environment Block')"
        )));
    }
    // Not text: a rewrite could not give it back as it is, so it is not rewritten.
    let text = std::str::from_utf8(&block[HEADER.len()..]).map_err(|_| {
        Error::new(
            "the GRUB environment block is not UTF-8 text, so layerboot will not rewrite it \
             (fix: remove it; the next `layerboot deploy` writes a new one)",
        )
    })?;
    let bytes = text.as_bytes();
    let mut vars = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'#' {
            at = record_end(bytes, at).map_or(bytes.len(), |end| end + 1);
            continue;
        }
        let Some(eq) = bytes[at..].iter().position(|&b| b == b'=').map(|i| at + i) else {
            break; // no `=` left: GRUB stops reading here
        };
        let Some(end) = record_end(bytes, eq + 1) else {
            break; // a value with no end: GRUB stops reading here too
        };
        if eq > at {
            vars.push((text[at..eq].to_string(), text[eq + 1..end].to_string()));
        }
        at = end + 1;
    }
    Ok(vars)
}

/// Where the record from `from` ends: its first newline that no backslash escapes.
fn record_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\n' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The block holding `vars`, padded to its size; refuses what does not fit.
pub fn render(vars: &[(String, String)]) -> Result<Vec<u8>> {
    let mut out = HEADER.as_bytes().to_vec();
    for (k, v) in vars {
        // Each variable must read back as itself: a name GRUB would cut or skip, or a value
        // whose end a newline or a last backslash would move, cannot be written.
        let line = format!("{k}={v}\n");
        let name_ok = !k.is_empty() && !k.contains('=') && !k.starts_with('#');
        if !name_ok || record_end(line.as_bytes(), k.len() + 1) != Some(line.len() - 1) {
            return Err(Error::new(format!(
                "GRUB environment variable '{k}' cannot be written as is"
            )));
        }
        out.extend(line.as_bytes());
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

    fn block(text: &str) -> Vec<u8> {
        let mut b = format!("{HEADER}{text}").into_bytes();
        b.resize(SIZE, b'#');
        b
    }

    #[test]
    fn other_tools_variables_survive_a_rewrite_byte_for_byte() {
        // grub-editenv's escaped newline and backslash, and a comment line.
        let text = "x=a\\\nb\nback=c\\\\\n# a comment\nlb_aaa=2\n";
        let mut vars = parse(&block(text)).unwrap();
        assert_eq!(get(&vars, "lb_aaa"), Some("2"));
        assert_eq!(get(&vars, "x"), Some("a\\\nb"));
        set(&mut vars, "lb_aaa", "good");
        let after = render(&vars).unwrap();
        assert!(
            after.starts_with(b"# GRUB Environment Block\nx=a\\\nb\nback=c\\\\\nlb_aaa=good\n#"),
            "{}",
            String::from_utf8_lossy(&after)
        );
        assert_eq!(parse(&after).unwrap(), vars);
    }

    #[test]
    fn a_record_the_padding_cuts_short_is_no_variable() {
        // As GRUB: `lb_bbb=2###…` has no end, so it is not read, nor its `#`s kept.
        let mut b = format!("{HEADER}lb_aaa=3\nlb_bbb=2").into_bytes();
        b.resize(SIZE, b'#');
        assert_eq!(parse(&b).unwrap(), [("lb_aaa".to_string(), "3".to_string())]);
        assert!(
            render(&[("x".into(), "a\\".into())]).is_err(),
            "a last backslash would eat the newline"
        );
        assert!(render(&[("x".into(), "a\nb".into())]).is_err());
        assert!(render(&[("#x".into(), "1".into())]).is_err());
    }

    #[test]
    fn a_block_that_is_not_text_is_not_rewritten() {
        let mut b = block("x=\u{e9}\n");
        b[HEADER.len() + 2] = 0xff;
        assert!(parse(&b).unwrap_err().to_string().contains("fix:"));
    }
}
