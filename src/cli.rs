//! Command line: GoCacheFS-compatible flags (single and double dash), validation -> `Config`.
