//! GoCacheFS compatibility: Go `flag`-style words (one or two dashes, `-name=value` or
//! `-name value`, `-w=false`) and libfuse's attached `-oOPTIONS` are rewritten into
//! clap's syntax before clap sees them ([`rewrite_args`]). Values and everything after
//! `--` pass through untouched (paths starting with `-`, non-UTF-8 paths). An unknown
//! single-dash word is one error line, with the nearest known flag suggested.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use super::{CliError, err};

/// Flags that take a value, by their long name (also written with one dash).
const VALUE_FLAGS: &[&str] = &[
    "src",
    "dst",
    "mountpoint",
    "retries",
    "concurrent",
    "retry-delay",
    "start-delay",
    "threads",
    "attr-ttl",
    "src-timeout",
    "drain-timeout",
    "revalidate",
    "src-settle",
    "metrics-addr",
    "cache-size",
    "min-free",
    "pin",
    "max-dirty",
    "lazy-threshold",
    "block-size",
    "interval",
    "count",
];
/// Boolean flags with a long name.
const BOOL_LONG_FLAGS: &[&str] = &[
    "log",
    "no-passthrough",
    "no-acl",
    "no-xattr",
    "lazy-fill",
    "json",
    "watch",
    "recursive",
    "evict",
    "help",
    "version",
];
/// Subcommands: the first word that is not a flag (then positional words may follow).
const SUBCOMMANDS: &[&[u8]] = &[b"status", b"man", b"completions", b"ctl", b"warmup"];
/// Boolean flags with a one-letter name (GoCacheFS's `-w`, `-d`; clap's `-h`, `-V`).
const BOOL_SHORT_FLAGS: &[&str] = &["w", "d", "h", "V"];

/// `--retry-delay <DURATION>` -> `-retry-delay` (how GoCacheFS users know the flag).
pub(super) fn go_flag(clap_arg: &str) -> String {
    let name = clap_arg.split([' ', '=']).next().unwrap_or(clap_arg);
    name.strip_prefix('-')
        .filter(|n| n.starts_with('-'))
        .unwrap_or(name)
        .to_string()
}

/// Rewrite Go-style flags into clap's syntax, following Go's `flag` rules: one or two dashes
/// mean the same thing, `-name=value` and `-name value` both work for value flags, and
/// boolean flags accept `=true`/`=false`. A single-dash word that is not a known flag is
/// an unknown flag (Go has no `-abc` = `-a -b -c` clusters); the one exception is libfuse's
/// attached `-oOPTIONS`. Values (the word after a value flag) and everything after `--`
/// pass through untouched, so paths starting with `-` and non-UTF-8 paths survive.
pub(crate) fn rewrite_args(argv: Vec<OsString>) -> Result<Vec<OsString>, CliError> {
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.into_iter();
    if let Some(argv0) = it.next() {
        out.push(argv0);
    }
    let mut status = false;
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            let rest: Vec<OsString> = it.collect();
            match rest.first() {
                Some(extra) if !status => return err(unexpected_msg(extra)),
                _ => {}
            }
            out.push(arg);
            out.extend(rest);
            break;
        }
        if !bytes.starts_with(b"-") || bytes == b"-" {
            if out.len() == 1 && SUBCOMMANDS.contains(&bytes) {
                status = true;
            } else if !status {
                return err(unexpected_msg(&arg));
            }
            out.push(arg);
            continue;
        }
        let double = bytes.starts_with(b"--");
        let body = &bytes[if double { 2 } else { 1 }..];
        let (name_bytes, value) = match body.iter().position(|&b| b == b'=') {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let shown = String::from_utf8_lossy(bytes).into_owned();
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            return err(unknown_flag_msg(&shown, ""));
        };
        if VALUE_FLAGS.contains(&name) {
            match value {
                Some(v) => out.push(join_os(&format!("--{name}="), v)),
                None => {
                    out.push(format!("--{name}").into());
                    if let Some(v) = it.next() {
                        out.push(v);
                    }
                }
            }
        } else if name == "o" {
            out.push("-o".into());
            match value {
                Some(v) => out.push(OsStr::from_bytes(v).to_os_string()),
                None => {
                    if let Some(v) = it.next() {
                        out.push(v);
                    }
                }
            }
        } else if BOOL_LONG_FLAGS.contains(&name) || BOOL_SHORT_FLAGS.contains(&name) {
            let on = match value {
                None => true,
                Some(v) => parse_go_bool(v).ok_or_else(|| {
                    CliError(format!(
                        "flag -{name} takes no value or =true/=false, got '{shown}'; write -{name} or -{name}=false"
                    ))
                })?,
            };
            if on {
                out.push(if name.len() == 1 {
                    format!("-{name}").into()
                } else {
                    format!("--{name}").into()
                });
            }
        } else if !double && name_bytes.len() > 1 && name_bytes.starts_with(b"o") {
            // libfuse style: -oallow_other,ro
            out.push("-o".into());
            out.push(OsStr::from_bytes(&bytes[2..]).to_os_string());
        } else {
            return err(unknown_flag_msg(&shown, name));
        }
    }
    Ok(out)
}

fn join_os(prefix: &str, value: &[u8]) -> OsString {
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(value);
    OsString::from_vec(v)
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"t" | b"T" | b"true" | b"TRUE" | b"True" => Some(true),
        b"0" | b"f" | b"F" | b"false" | b"FALSE" | b"False" => Some(false),
        _ => None,
    }
}

fn unexpected_msg(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if a == "status" {
        "unexpected argument 'status': the subcommand comes first, as in 'cachefs status DST'"
            .to_string()
    } else {
        format!(
            "unexpected argument '{a}': cachefs takes only flags (e.g. -src DIR); \
             run 'cachefs --help' to list them"
        )
    }
}

fn unknown_flag_msg(shown: &str, name: &str) -> String {
    let all = VALUE_FLAGS
        .iter()
        .chain(BOOL_LONG_FLAGS)
        .chain(["w", "d", "o"].iter());
    // A prefix of a flag (-mount), or a typo: one edit, two for long names.
    let best = all
        .map(|f| {
            let prefix = name.len() >= 3 && f.starts_with(name);
            (if prefix { 0 } else { edit_distance(name, f) }, *f)
        })
        .filter(|(d, _)| *d <= if name.len() >= 6 { 2 } else { 1 })
        .min();
    match best {
        Some((_, f)) => format!(
            "unknown flag '{shown}' (did you mean -{f}?); run 'cachefs --help' to list the flags"
        ),
        None => format!("unknown flag '{shown}'; run 'cachefs --help' to list the flags"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
