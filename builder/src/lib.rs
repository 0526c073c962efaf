//! layerboot's build-time half as a library (booster's generator, in spirit): the
//! `layerboot` binary is a thin argument parser over it, and `vm-tests` and `bench/`
//! reuse its archive writer and module resolver instead of keeping copies.
//! The boot-time half is `layerboot-init`, whose library this one shares.

pub mod archive;
pub mod deploy;
pub mod entry;
pub mod image;
pub mod initramfs;
pub mod inspect;
pub mod kernel;
pub mod modules;
