//! layerboot's boot-time library: everything `/init` does that can be tested on a host.
//!
//! - [`store`], [`reference`], [`lookup`]: read an engine's image store offline and
//!   turn a reference into the layer directories to mount.
//! - the PID 1 program itself is `src/main.rs`.

pub mod digest;
pub mod error;
pub mod lookup;
pub mod reference;
pub mod store;

pub use error::{Error, Result};
