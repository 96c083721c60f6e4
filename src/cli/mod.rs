//! Command line: GoCacheFS-compatible flags, validation, and the resulting [`Config`].
//!
//! Guarantees:
//! - Every GoCacheFS flag is accepted the way Go's `flag` package accepts it: `-src /a`,
//!   `-src=/a`, `--src /a`, `--src=/a`, and boolean flags as `-w`, `-w=true`, `-w=false`.
//!   libfuse's attached form `-oallow_other` works too. cachefs's own flags
//!   (`--threads`, `--attr-ttl`, `--no-passthrough`) accept the same spellings.
//! - [`parse`] never touches the system and `validate` only looks at it through the
//!   `Probe` trait, so every rule is unit-tested with a fake system.
//! - A rejected command line yields exactly one [`CliError`]: a single line that names the
//!   problem and the fix. `main` prints it and exits with status 2 before anything is
//!   mounted or written.
//! - An accepted command line yields a [`Config`] with every field set and the three
//!   directories canonical, existing, distinct, not nested in one another, and the
//!   mountpoint not already a mount point.
//!
//! # Files
//!
//! This file turns `argv` into an [`Action`] ([`parse`]); `args` holds the clap
//! definitions, `goflags` the GoCacheFS single-dash compatibility (run before clap),
//! `validate` the checks that build the [`Config`], and `help` the man page and shell
//! completions generated from the clap definitions.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::Config;

mod args;
mod goflags;
mod help;
mod validate;

pub use args::{Cli, Command, CompletionShell, CtlCommand, MountArgs, Setting};
use goflags::go_flag;
pub(crate) use goflags::rewrite_args;
pub(crate) use help::{completions, man_page};
#[cfg(test)]
use validate::check_layout;
pub(crate) use validate::{HostProbe, Probe, check_not_mounted, parse_duration, validate};

pub use crate::config::EXIT_USAGE;

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    /// Mount: the validated configuration.
    Mount(Box<Config>),
    /// `cachefs status DST [--json]`: report the writeback queue of a cache directory.
    Status { dst: PathBuf, json: bool },
    /// `cachefs status DST --watch`: live rates from the running daemon.
    Watch {
        dst: PathBuf,
        interval: Duration,
        count: Option<u64>,
    },
    /// `cachefs ctl DST COMMAND`: a request to the running daemon.
    Ctl {
        dst: PathBuf,
        ctl: crate::control::client::Ctl,
        json: bool,
    },
    /// `cachefs warmup PATH...`.
    Warmup(crate::control::warmup::Warmup),
    /// `--help` or `--version`: print this to stdout and exit 0.
    Print(String),
}

/// A rejected command line: one line naming the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub(crate) String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cachefs: {}", self.0)
    }
}

impl std::error::Error for CliError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}
/// Parse `argv` (including `argv[0]`) into an [`Action`], validating against the real system.
pub fn parse<I, T>(argv: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with(argv, &HostProbe)
}

/// [`parse`] with an injected view of the system.
pub(crate) fn parse_with<I, T>(argv: I, probe: &dyn Probe) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args = rewrite_args(argv.into_iter().map(Into::into).collect())?;
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Some(Command::Status {
            dst,
            json,
            watch: true,
            interval,
            count,
        }) => {
            let _ = json;
            let interval = parse_duration("interval", &interval)?;
            if interval.is_zero() {
                return err("--interval must be more than 0; write e.g. --interval 1s");
            }
            Ok(Action::Watch {
                dst,
                interval,
                count,
            })
        }
        Some(Command::Status { dst, json, .. }) => Ok(Action::Status { dst, json }),
        Some(Command::Ctl { dst, json, command }) => {
            use crate::control::client::Ctl;
            let ctl = match command {
                CtlCommand::Info => Ctl::Info,
                CtlCommand::Stats => Ctl::Stats,
                CtlCommand::State { paths, recursive } => Ctl::State { paths, recursive },
                CtlCommand::Retry => Ctl::Retry,
                CtlCommand::Revalidate { paths } => Ctl::Revalidate { paths },
                CtlCommand::Pin { paths } => Ctl::Pin { paths },
                CtlCommand::Unpin { paths } => Ctl::Unpin { paths },
                CtlCommand::Evict { paths, recursive } => Ctl::Evict { paths, recursive },
                CtlCommand::Set { name, value } => {
                    // Checked here so a bad value is a usage error before connecting.
                    crate::control::client::set_request(name.name(), &value).map_err(CliError)?;
                    Ctl::Set {
                        name: name.name().to_string(),
                        value,
                    }
                }
            };
            Ok(Action::Ctl { dst, ctl, json })
        }
        Some(Command::Warmup {
            paths,
            recursive,
            evict,
            dst,
        }) => Ok(Action::Warmup(crate::control::warmup::Warmup {
            paths,
            recursive,
            evict,
            dst,
        })),
        Some(Command::Man) => Ok(Action::Print(man_page())),
        Some(Command::Completions { shell }) => Ok(Action::Print(completions(shell))),
        None => validate(&cli.mount, probe).map(|c| Action::Mount(Box::new(c))),
    }
}

/// Turn a clap error into text to print with exit 0 (help, version) or one line.
fn clap_error(e: clap::Error) -> Result<Action, CliError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return Ok(Action::Print(e.to_string()));
    }
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let msg = match (e.kind(), arg) {
        (ErrorKind::UnknownArgument, Some(a)) => {
            format!("unknown argument '{a}'; run 'cachefs --help' to list the flags")
        }
        (ErrorKind::InvalidSubcommand, Some(a)) => {
            format!("unknown argument '{a}'; run 'cachefs --help' to list the flags")
        }
        (ErrorKind::InvalidValue, Some(a)) if a.starts_with('<') => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => v.join(", "),
                _ => String::new(),
            };
            format!("'{value}' is not a valid {a}; use one of: {valid}")
        }
        (ErrorKind::InvalidValue, Some(a)) | (ErrorKind::NoEquals, Some(a)) => format!(
            "flag {} needs a value; write it as {} VALUE",
            go_flag(&a),
            go_flag(&a)
        ),
        _ => {
            // clap's text, minus its usage block, folded onto one line.
            let text = e.to_string();
            let body: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let body = body.join(" ");
            let body = body.strip_prefix("error: ").unwrap_or(&body);
            format!("{body}; run 'cachefs --help' for usage")
        }
    };
    err(msg)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;

    use super::*;
    use crate::config;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// A fake system: every path under /fake is a directory whose canonical form is itself,
    /// except a few special names.
    struct Fake {
        mountinfo: String,
        euid: u32,
        fusermount: bool,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                mountinfo: "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n".into(),
                euid: 0,
                fusermount: false,
            }
        }
    }

    impl Probe for Fake {
        fn dir(&self, path: &Path) -> io::Result<(PathBuf, bool)> {
            let s = path.to_str().unwrap();
            match s {
                "/fake/missing" => Err(io::Error::from_raw_os_error(libc::ENOENT)),
                "/fake/stale" => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
                "/fake/file" => Ok((path.into(), false)),
                "/fake/link-to-src" => Ok(("/fake/src".into(), true)),
                _ => Ok((path.into(), true)),
            }
        }
        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.mountinfo.clone())
        }
        fn euid(&self) -> u32 {
            self.euid
        }
        fn has_fusermount(&self) -> bool {
            self.fusermount
        }
    }

    fn run(args: &[&str], fake: &Fake) -> Result<Action, CliError> {
        let mut v = vec!["cachefs"];
        v.extend_from_slice(args);
        parse_with(v, fake)
    }

    fn cfg(args: &[&str]) -> Config {
        match run(args, &Fake::default()) {
            Ok(Action::Mount(c)) => *c,
            other => panic!("expected a mount config, got {other:?}"),
        }
    }

    fn fail(args: &[&str]) -> String {
        fail_with(args, &Fake::default())
    }

    fn fail_with(args: &[&str], fake: &Fake) -> String {
        match run(args, fake) {
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "error must be one line: {s:?}");
                s
            }
            Ok(a) => panic!("expected an error for {args:?}, got {a:?}"),
        }
    }

    const BASE: [&str; 6] = [
        "-src",
        "/fake/src",
        "-dst",
        "/fake/dst",
        "-mountpoint",
        "/fake/mnt",
    ];

    fn with(extra: &[&str]) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = BASE.to_vec();
        for e in extra {
            v.push(Box::leak(e.to_string().into_boxed_str()));
        }
        v
    }

    #[test]
    fn go_single_dash_flags_parse() {
        let c = cfg(&BASE);
        assert_eq!(c.src, Path::new("/fake/src"));
        assert_eq!(c.dst, Path::new("/fake/dst"));
        assert_eq!(c.mountpoint, Path::new("/fake/mnt"));
        assert!(!c.writeback);
        assert_eq!((c.retries, c.concurrent), (5, 10));
        assert_eq!(c.retry_delay, Duration::ZERO);
        assert_eq!(c.start_delay, Duration::ZERO);
        assert_eq!(c.attr_ttl, Duration::from_secs(1));
        assert_eq!(c.threads, config::default_threads());
        assert!(c.passthrough && c.acl && !c.debug && !c.log_writeback);
        assert!(c.mount_options.is_empty());
    }

    #[test]
    fn double_dash_and_equals_forms_parse() {
        let c = cfg(&[
            "--src",
            "/fake/src",
            "--dst=/fake/dst",
            "-mountpoint=/fake/mnt",
            "-retry-delay=3",
            "--start-delay",
            "1.5",
            "-retries=7",
            "--concurrent=0",
        ]);
        assert_eq!(c.dst, Path::new("/fake/dst"));
        assert_eq!(c.mountpoint, Path::new("/fake/mnt"));
        assert_eq!(c.retry_delay, Duration::from_secs(3));
        assert_eq!(c.start_delay, Duration::from_millis(1500));
        assert_eq!((c.retries, c.concurrent), (7, 0));
    }

    #[test]
    fn every_flag_sets_its_field() {
        let c = cfg(&with(&[
            "-w",
            "-d",
            "-log",
            "-o",
            "allow_other,ro",
            "-o=default_permissions",
            "-onosuid",
            "--threads",
            "3",
            "--attr-ttl=0.25",
            "--no-passthrough",
            "--no-acl",
        ]));
        assert!(c.writeback && c.debug && c.log_writeback && !c.passthrough && !c.acl);
        assert_eq!(
            c.mount_options,
            ["allow_other", "ro", "default_permissions", "nosuid"]
        );
        assert_eq!(c.threads, 3);
        assert_eq!(c.attr_ttl, Duration::from_millis(250));
    }

    #[test]
    fn go_bool_values() {
        assert!(cfg(&with(&["-w=true"])).writeback);
        assert!(!cfg(&with(&["-w=false"])).writeback);
        assert!(cfg(&with(&["--w"])).writeback);
        assert!(cfg(&with(&["-d=1", "-log=T"])).debug);
        assert!(fail(&with(&["-w=maybe"])).contains("-w=false"));
    }

    #[test]
    fn values_that_look_like_flags_pass_through() {
        let v = rewrite_args(os(&["c", "-src", "-weird", "-o", "-x", "-dst=-y"])).unwrap();
        assert_eq!(v, os(&["c", "--src", "-weird", "-o", "-x", "--dst=-y"]));
        let c = cfg(&["-src", "-s", "-dst", "--d", "-mountpoint", "-m", "-o", "-x"]);
        assert_eq!(
            (c.src.as_path(), c.dst.as_path(), c.mountpoint.as_path()),
            (Path::new("-s"), Path::new("--d"), Path::new("-m"))
        );
        assert_eq!(c.mount_options, ["-x"]);
        let v = rewrite_args(os(&["c", "status", "-json", "--", "-dir"])).unwrap();
        assert_eq!(v, os(&["c", "status", "--json", "--", "-dir"]));
    }

    #[test]
    fn help_and_version() {
        for h in ["-h", "--help", "-help"] {
            match run(&[h], &Fake::default()) {
                Ok(Action::Print(text)) => {
                    for flag in [
                        "--src",
                        "--dst",
                        "--mountpoint",
                        "-w",
                        "--retries",
                        "--concurrent",
                        "--retry-delay",
                        "--start-delay",
                        "-d",
                        "--log",
                        "-o",
                        "--threads",
                        "--attr-ttl",
                        "--no-passthrough",
                        "--version",
                        "status",
                    ] {
                        assert!(text.contains(flag), "{h}: help lacks {flag}:\n{text}");
                    }
                }
                other => panic!("{h}: {other:?}"),
            }
        }
        for v in ["--version", "-version", "-V"] {
            match run(&[v], &Fake::default()) {
                Ok(Action::Print(text)) => assert!(text.contains(env!("CARGO_PKG_VERSION"))),
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn status_subcommand() {
        match run(&["status", "/x", "--json"], &Fake::default()) {
            Ok(Action::Status { dst, json }) => {
                assert_eq!(dst, Path::new("/x"));
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
        match run(&["status", "/x"], &Fake::default()) {
            Ok(Action::Status { json, .. }) => assert!(!json),
            other => panic!("{other:?}"),
        }
        let e = fail(&["status"]);
        assert!(e.contains("<DST>") && e.contains("cachefs --help"), "{e}");
        assert!(matches!(
            run(&["status", "-json", "/x"], &Fake::default()),
            Ok(Action::Status { json: true, .. })
        ));
    }

    #[test]
    fn missing_flags() {
        assert!(fail(&[]).contains("missing -src"));
        assert!(fail(&["-src", "/fake/src"]).contains("missing -dst"));
        assert!(fail(&["-src", "/fake/src", "-dst", "/fake/dst"]).contains("missing -mountpoint"));
        assert!(fail(&["-src=", "-dst", "/a", "-mountpoint", "/b"]).contains("missing -src"));
        // A value flag at the very end has no value.
        assert!(fail(&["-src"]).contains("-src"));
    }

    #[test]
    fn unknown_flags() {
        let e = fail(&with(&["-mount", "/x"]));
        assert!(
            e.contains("unknown flag '-mount'") && e.contains("--help"),
            "{e}"
        );
        let e = fail(&with(&["-retry_delay=3"]));
        assert!(e.contains("did you mean -retry-delay"), "{e}");
        let e = fail(&with(&["--bogus"]));
        assert!(e.contains("unknown flag '--bogus'"), "{e}");
        let e = fail(&with(&["-x"]));
        assert!(e.contains("unknown flag '-x'"), "{e}");
        let e = fail(&with(&["-foo"]));
        assert!(!e.contains("did you mean"), "{e}");
        let e = fail(&with(&["-mount", "/x"]));
        assert!(e.contains("did you mean -mountpoint"), "{e}");
        let e = fail(&with(&["stray"]));
        assert!(e.contains("unexpected argument 'stray'"), "{e}");
        let e = fail(&with(&["--", "-d"]));
        assert!(e.contains("unexpected argument '-d'"), "{e}");
        let e = fail(&with(&["status", "/x"]));
        assert!(e.contains("subcommand comes first"), "{e}");
        // A trailing `--` is harmless, as in Go.
        cfg(&with(&["--"]));
    }

    #[test]
    fn bad_numbers() {
        for (flag, bad) in [
            ("-retries", "abc"),
            ("-retries", "-1"),
            ("-concurrent", "1.5"),
            ("-retry-delay", "soon"),
            ("-start-delay", "-2"),
            ("--attr-ttl", "NaN"),
            ("--threads", "0"),
            ("--threads", "x"),
        ] {
            let e = fail(&with(&[flag, bad]));
            assert!(
                e.contains(bad) && e.contains("write e.g."),
                "{flag} {bad}: {e}"
            );
        }
    }

    #[test]
    fn durations_take_units() {
        let ms = Duration::from_millis;
        for (v, want) in [
            ("0", Duration::ZERO),
            ("2", ms(2000)),
            ("0.5", ms(500)),
            (" 1.25 ", ms(1250)),
            ("500ms", ms(500)),
            ("30s", ms(30_000)),
            ("1.5s", ms(1500)),
            ("5m", ms(300_000)),
            ("1h", ms(3_600_000)),
            ("1.5h", ms(5_400_000)),
            ("1h30m", ms(5_400_000)),
            ("2m30s", ms(150_000)),
            ("1d", ms(86_400_000)),
            ("0s", Duration::ZERO),
            (".5s", ms(500)),
            ("250us", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
        ] {
            assert_eq!(parse_duration("x", v).unwrap(), want, "{v}");
        }
        for bad in [
            "",
            "s",
            "-1s",
            "-2",
            "1x",
            "5 m",
            "1.2.3s",
            "NaN",
            "inf",
            "1h-5m",
            "1e3s",
            "m5",
            "99999999999999999999999h",
        ] {
            let e = parse_duration("revalidate", bad).unwrap_err().to_string();
            assert!(
                e.contains("is not a duration") && e.contains("-revalidate 30s"),
                "{bad}: {e}"
            );
        }
        let c = cfg(&with(&[
            "--attr-ttl",
            "250ms",
            "-retry-delay=2s",
            "-start-delay",
            "1m",
            "--src-timeout=1h",
            "--drain-timeout",
            "45s",
            "--revalidate",
            "5m",
        ]));
        assert_eq!(c.attr_ttl, ms(250));
        assert_eq!(c.retry_delay, ms(2000));
        assert_eq!(c.start_delay, ms(60_000));
        assert_eq!(c.src_timeout, ms(3_600_000));
        assert_eq!(c.drain_timeout, ms(45_000));
        assert_eq!(c.revalidate, ms(300_000));
    }

    #[test]
    fn directory_problems() {
        let e = fail(&[
            "-src",
            "/fake/missing",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-src /fake/missing does not exist") && e.contains("mkdir -p"));
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/file",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-dst /fake/file is not a directory"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/stale",
        ]);
        assert!(
            e.contains("stale FUSE mount")
                && e.contains("fusermount3 -u /fake/stale")
                && e.contains("umount -l /fake/stale"),
            "{e}"
        );
    }

    #[test]
    fn same_or_nested_directories() {
        let e = fail(&[
            "-src",
            "/fake/src",
            "-dst",
            "/fake/link-to-src",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-src and -dst are the same directory"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/a",
            "-dst",
            "/fake/b",
            "-mountpoint",
            "/fake/a",
        ]);
        assert!(e.contains("-src and -mountpoint are the same"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/s/cache",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(
            e.contains("-dst /fake/s/cache is inside -src /fake/s"),
            "{e}"
        );
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/d/m",
        ]);
        assert!(
            e.contains("-mountpoint /fake/d/m is inside -dst /fake/d"),
            "{e}"
        );
        let e = fail(&[
            "-src",
            "/fake/m/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(
            e.contains("-src /fake/m/s is inside -mountpoint /fake/m"),
            "{e}"
        );
        // A common prefix that is not a path prefix is fine.
        check_layout(
            Path::new("/fake/s"),
            Path::new("/fake/s2"),
            Path::new("/fake/m"),
        )
        .unwrap();
    }

    #[test]
    fn already_mounted() {
        let fake = Fake {
            mountinfo: "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n\
                        40 22 0:35 / /fake/m\\040x rw,relatime - tmpfs tmpfs rw\n"
                .into(),
            ..Fake::default()
        };
        let e = fail_with(
            &[
                "-src",
                "/fake/s",
                "-dst",
                "/fake/d",
                "-mountpoint",
                "/fake/m x",
            ],
            &fake,
        );
        assert!(
            e.contains("already a mount point (tmpfs)") && e.contains("umount /fake/m x"),
            "{e}"
        );
        // A mount below or beside the mountpoint is not a problem.
        assert!(matches!(
            run(
                &[
                    "-src",
                    "/fake/s",
                    "-dst",
                    "/fake/d",
                    "-mountpoint",
                    "/fake/m"
                ],
                &fake
            ),
            Ok(Action::Mount(_))
        ));
    }

    #[test]
    fn mount_permission() {
        let fake = Fake {
            euid: 1000,
            ..Fake::default()
        };
        let e = fail_with(&BASE, &fake);
        assert!(
            e.contains("not root") && e.contains("apt-get install fuse3"),
            "{e}"
        );
        let fake = Fake {
            euid: 1000,
            fusermount: true,
            ..Fake::default()
        };
        assert!(matches!(run(&BASE, &fake), Ok(Action::Mount(_))));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn lazy_fetch_flags() {
        let c = cfg(&with(&[]));
        assert_eq!((c.lazy_threshold, c.block_size), (64 << 20, 1 << 20));
        let c = cfg(&with(&["--lazy-threshold", "1G", "-block-size=256K"]));
        assert_eq!((c.lazy_threshold, c.block_size), (1 << 30, 256 << 10));
        assert_eq!(cfg(&with(&["--lazy-threshold", "0"])).lazy_threshold, 0);
        assert!(!c.lazy_fill);
        assert!(cfg(&with(&["-lazy-fill"])).lazy_fill);
        for (args, needle) in [
            (
                &["--lazy-threshold", "big"][..],
                "--lazy-threshold 'big' is not a size",
            ),
            (&["--block-size", "1000"][..], "must be a multiple of 4K"),
            (&["--block-size", "0"][..], "between 4K and 64M"),
            (&["--block-size", "128M"][..], "between 4K and 64M"),
            (&["--block-size", "x"][..], "--block-size 'x' is not a size"),
            (
                &["--lazy-fill", "--lazy-threshold", "0"][..],
                "--lazy-fill completes lazily fetched files",
            ),
        ] {
            let e = fail_with(&with(args), &Fake::default());
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn cache_budget_flags() {
        let c = cfg(&with(&[
            "--cache-size",
            "20G",
            "-min-free=5%",
            "--pin",
            "videos/**",
            "-pin",
            "*.jpg",
            "--max-dirty",
            "1.5G",
            "-w",
        ]));
        assert_eq!(c.cache_size, Some(20 << 30));
        assert_eq!(c.min_free, Some(config::MinFree::Percent(5.0)));
        assert_eq!(c.pins, vec!["videos/**".to_string(), "*.jpg".into()]);
        assert_eq!(c.max_dirty, Some(3 << 29));
        let c = cfg(&with(&["--min-free", "10G"]));
        assert_eq!(c.min_free, Some(config::MinFree::Bytes(10 << 30)));
        assert_eq!(c.cache_size, None);
        assert!(c.pins.is_empty());
        for (args, needle) in [
            (
                &["--cache-size", "20X"][..],
                "--cache-size '20X' is not a size",
            ),
            (&["--cache-size", "0"][..], "must be more than 0"),
            (&["--cache-size", "-5G"][..], "is not a size"),
            (
                &["--min-free", "150%"][..],
                "--min-free '150%' is not a size or a percentage",
            ),
            (
                &["--min-free", "lots"][..],
                "write e.g. --min-free 10G or --min-free 5%",
            ),
            (&["--pin", "a/[b"][..], "--pin 'a/[b' is not a valid glob"),
            (&["--max-dirty", "x"][..], "--max-dirty 'x' is not a size"),
            (
                &["--max-dirty", "1G"][..],
                "--max-dirty bounds data waiting for writeback, which needs -w",
            ),
        ] {
            let e = fail(&with(args));
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
