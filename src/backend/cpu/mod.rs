//! The CPU reference backend (filled in by issue 2).
