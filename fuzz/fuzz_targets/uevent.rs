//! `coldplug::uevent_modalias` on an arbitrary netlink uevent message. A panic is a bug;
//! an answer must be the value of a `MODALIAS=` field of the message.
#![no_main]

use layerboot_init::coldplug::uevent_modalias;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(alias) = uevent_modalias(data) {
        let field = format!("MODALIAS={alias}");
        assert!(
            data.split(|&b| b == 0).any(|kv| kv == field.as_bytes()),
            "{alias:?} is not a MODALIAS= field of the message"
        );
    }
});
