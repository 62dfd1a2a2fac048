//! See ARCHITECTURE.md.

pub mod resize;
