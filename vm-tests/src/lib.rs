//! Helpers for the VM boot tests live in tests/.
