//! `zhllama demo`: the whole recipe end to end on built-in, procedurally generated data.

pub mod corpus;
pub mod run;
