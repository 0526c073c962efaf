//! layerboot's boot-time library: everything `/init` does that can be tested on a host.
//!
//! - [`store`], [`reference`], [`lookup`]: read an engine's image store offline and
//!   turn a reference into the layer directories to mount.
//! - the PID 1 program itself is `src/main.rs`.

pub mod boot;
pub mod btrfs;
pub mod console;
pub mod coldplug;
pub mod copy;
pub mod digest;
pub mod error;
pub mod kmod;
pub mod lookup;
pub mod mounts;
pub mod probe;
pub mod reference;
pub mod settings;
pub mod store;
pub mod switch;
pub mod writable;

pub use error::{Error, Result};
