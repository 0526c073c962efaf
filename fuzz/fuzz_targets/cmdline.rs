//! Boot settings from untrusted text: the input (lossy UTF-8) as a kernel command line
//! (`settings::parse_cmdline`, then `Settings::resolve` with the default config), as
//! `/etc/layerboot.json` (`Config::parse`, then `resolve` against a fixed command line),
//! and, split at the first NUL, as both at once. Errors are fine; a panic is a bug.
#![no_main]

use layerboot_init::settings::{parse_cmdline, Config, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let map = parse_cmdline(&text);
    let _ = Settings::resolve(&map, &Config::default());

    let fixed = parse_cmdline("root=/dev/vda docker_image=x");
    if let Ok(config) = Config::parse(&text) {
        let _ = Settings::resolve(&fixed, &config);
        let _ = Settings::resolve(&parse_cmdline(""), &config);
    }

    if let Some((line, json)) = text.split_once('\0') {
        if let Ok(config) = Config::parse(json) {
            let _ = Settings::resolve(&parse_cmdline(line), &config);
        }
    }
});
