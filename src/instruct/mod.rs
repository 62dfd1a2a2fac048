//! See ARCHITECTURE.md.
pub mod convert;
pub mod filter;
pub mod mix;
