//! Instruction data: source converters, rule filters and mixing (`convert`, `filter`, `mix`), and the
//! self-instruct crawler (`crawl*`, `reply_parse`, `rouge`). Never touches a backend.
pub mod convert;
pub mod crawl;
pub mod crawl_prompt;
pub mod crawl_rate;
pub mod filter;
pub mod mix;
pub mod reply_parse;
pub mod rouge;
