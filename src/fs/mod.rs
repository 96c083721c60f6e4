//! The layered view over dst (cache) and src (slow), with no fuser types.
pub mod names;
