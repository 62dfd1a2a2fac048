//! See ARCHITECTURE.md.
pub mod crawl;
pub mod crawl_prompt;
pub mod crawl_rate;
pub mod reply_parse;
pub mod rouge;
