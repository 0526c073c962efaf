//! layerboot's boot-time library: everything `/init` does, testable on a host.
//!
//! - [`store`], [`reference`], [`lookup`], [`digest`], [`bolt`]: read an engine's image
//!   store (Docker, podman, containerd) offline and turn a reference into the layer
//!   directories to mount;
//! - [`settings`]: kernel command line and `/etc/layerboot.json`;
//! - [`kmod`], [`coldplug`], [`probe`]: modules, devices and superblocks, without udev;
//! - [`btrfs`], [`writable`], [`copy`], [`mounts`]: the fresh writable root and the top layer;
//! - [`switch`], [`console`]: handing over to the image's init, and failing readably;
//! - [`shutdown`]: the way back at shutdown, to unmount the root and the store cleanly;
//! - [`bless`], [`deadline`], [`after_switch`]: boot assessment: the bless, the reboot
//!   deadline of a counted boot, and the helper /init leaves behind to keep it;
//! - [`arena`]: /init's allocator, which never gives memory back before the exec;
//! - [`cost`]: /init's own CPU time apart from the kernel work it asks for;
//! - [`boot`]: the sequence that ties them together. `src/main.rs` only guards PID 1.

pub mod after_switch;
pub mod arena;
pub mod bless;
pub mod bolt;
pub mod boot;
pub mod bootcount;
pub mod btrfs;
pub mod coldplug;
pub mod console;
pub mod copy;
pub mod cost;
pub mod deadline;
pub mod digest;
pub mod error;
pub mod esp_lock;
pub mod grubenv;
pub mod kmod;
pub mod lookup;
pub mod mounts;
pub mod probe;
pub mod reference;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod switch;
pub mod writable;
pub mod xattr;

pub use error::{Error, Result};
