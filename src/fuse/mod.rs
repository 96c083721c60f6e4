//! Thin `fuser::Filesystem` adapter over `fs::CacheFs`.
