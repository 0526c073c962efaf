//! The module index from arbitrary depmod files: the input split at 0xFF bytes into
//! modules.dep, modules.softdep, modules.alias and modules.builtin for
//! `kmod::ModuleIndex::parse`, then `resolve`, `contains`, `is_builtin`, `path`,
//! `fits_cpu` on words taken from the input, `load_order` on them (which must list each
//! module once, as documented) and `render` of them. A panic or a hang is a bug.
#![no_main]

use std::collections::BTreeSet;

use layerboot_init::kmod::ModuleIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default();
    let (dep, softdep, alias, builtin) = (next(), next(), next(), next());
    let idx = ModuleIndex::parse(&dep, &softdep, &alias, &builtin);

    // Names and aliases to ask about: words of every file, a few of each.
    let words: Vec<String> = [&dep, &softdep, &alias, &builtin]
        .iter()
        .flat_map(|t| t.split(|c: char| c.is_ascii_whitespace() || c == ':').filter(|w| !w.is_empty()).take(6))
        .map(str::to_string)
        .collect();
    let mut wanted = Vec::new();
    for w in &words {
        wanted.extend(idx.resolve(w));
        let _ = (idx.contains(w), idx.is_builtin(w), idx.path(w));
        let _ = idx.fits_cpu(w, "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001,0094");
    }
    for list in [&words, &wanted] {
        if let Ok(steps) = idx.load_order(list) {
            let mut seen = BTreeSet::new();
            for s in &steps {
                assert!(seen.insert(&s.name), "load_order lists {} twice: {steps:?}", s.name);
            }
        }
    }
    let names: BTreeSet<String> = words.iter().chain(&wanted).cloned().collect();
    let _ = idx.render(&names);
});
