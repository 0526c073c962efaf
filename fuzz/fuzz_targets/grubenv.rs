//! layerboot's GRUB environment block (`ESP/layerboot/grubenv`), which anyone with the
//! disk can edit and the bless service reads at every boot: `grubenv::parse`, then what
//! the code promises of a block it could read:
//! - every variable is one GRUB reads: a name, not empty, with no `=`, not a comment;
//! - each variable's `name=value` line is in the block as is, in order (values are kept
//!   escapes and all), so `render` gives back every variable byte for byte and
//!   `parse(render(vars)) == vars`;
//! - a rewrite as the bless and `deploy` do it (`set` one `lb_` variable, `render`)
//!   changes that variable alone, reads back as set, and is refused only when the block
//!   would overflow its 1024 bytes;
//! - `render` of any one variable refuses it or reads back as itself.
//!
//! Input: one control byte, then text. Control bit 0: the text is the whole file (sizes
//! and headers other than a block's); else the block is the header, the text, then `#`
//! padding to 1024 bytes, as `grub-editenv` pads. Bits 1–2: the value set (`good`, `0`,
//! `1`, `3`); bits 3–7: which variable (one of the block's `lb_` names, or a new one).
#![no_main]

use layerboot_init::grubenv::{self, SIZE};
use libfuzzer_sys::fuzz_target;

const HEADER: &[u8] = b"# GRUB Environment Block\n";

fn line(k: &str, v: &str) -> Vec<u8> {
    format!("{k}={v}\n").into_bytes()
}

/// Where `needle` first is in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let block = if control & 1 != 0 {
        rest.to_vec()
    } else {
        let mut b = HEADER.to_vec();
        b.extend(rest);
        b.truncate(SIZE);
        b.resize(SIZE, b'#');
        b
    };

    // Any single variable: refused, or read back as itself.
    let text = String::from_utf8_lossy(rest);
    if let Some((k, v)) = text.split_once('=') {
        let one = vec![(k.to_string(), v.to_string())];
        if let Ok(b) = grubenv::render(&one) {
            assert_eq!(b.len(), SIZE);
            assert_eq!(
                grubenv::parse(&b).ok(),
                Some(one),
                "{text:?} renders, but reads back otherwise"
            );
        }
    }

    let Ok(vars) = grubenv::parse(&block) else { return };
    assert!(
        block.len() == SIZE && block.starts_with(HEADER),
        "not a block, yet parsed"
    );
    assert!(
        std::str::from_utf8(&block[HEADER.len()..]).is_ok(),
        "not text, yet parsed"
    );

    // Every variable's line is in the block as it is, in order, none overlapping.
    let mut at = HEADER.len();
    let mut body = HEADER.to_vec();
    for (k, v) in &vars {
        assert!(!k.is_empty() && !k.contains('=') && !k.starts_with('#'), "name {k:?}");
        let l = line(k, v);
        let found = find(&block, &l, at).unwrap_or_else(|| panic!("{k}={v:?} is not in the block from {at}"));
        at = found + l.len();
        body.extend(&l);
    }

    // So it renders, as those lines, and reads back the same.
    let rendered = grubenv::render(&vars).unwrap_or_else(|e| panic!("a block read renders no more: {e}"));
    assert_eq!(
        &rendered[..body.len()],
        &body[..],
        "render is not the variables' own lines"
    );
    assert!(rendered[body.len()..].iter().all(|&b| b == b'#'), "padding");
    assert_eq!(grubenv::parse(&rendered).unwrap(), vars, "render/parse round trip");

    // A rewrite as the bless does: one variable set, the others byte for byte.
    let names: Vec<&String> = vars
        .iter()
        .map(|(k, _)| k)
        .filter(|k| {
            k.strip_prefix("lb_")
                .is_some_and(|id| grubenv::tries_variable(id).as_ref() == Some(*k))
        })
        .collect();
    let pick = (control >> 3) as usize;
    let var = match names.get(pick) {
        Some(k) => k.to_string(),
        None => grubenv::tries_variable(&format!("{pick:012x}")).unwrap(),
    };
    let value = ["good", "0", "1", "3"][((control >> 1) & 3) as usize];
    let mut after = vars.clone();
    grubenv::set(&mut after, &var, value);
    let changed = vars.iter().position(|(k, _)| *k == var);
    match changed {
        Some(i) => {
            assert_eq!(after.len(), vars.len());
            for (j, (a, b)) in vars.iter().zip(&after).enumerate() {
                assert!(j == i || a == b, "set {var} changed {a:?} into {b:?}");
            }
        }
        None => assert_eq!(&after[..vars.len()], &vars[..], "set {var} changed others"),
    }
    let need = HEADER.len() + after.iter().map(|(k, v)| line(k, v).len()).sum::<usize>();
    match grubenv::render(&after) {
        Ok(b) => {
            assert!(need <= SIZE);
            let again = grubenv::parse(&b).unwrap();
            assert_eq!(again, after, "a rewrite reads back otherwise");
            assert_eq!(grubenv::get(&again, &var), Some(value));
            // Every other variable's line as it was, in the same order.
            let mut at = HEADER.len();
            for (k, v) in again.iter().filter(|(k, _)| *k != var) {
                let l = line(k, v);
                at = find(&b, &l, at).unwrap_or_else(|| panic!("{k} lost in the rewrite")) + l.len();
            }
        }
        Err(e) => {
            assert!(need > SIZE, "a rewrite that fits is refused: {e}");
            assert!(e.to_string().contains("fix:"), "{e}");
        }
    }
});
