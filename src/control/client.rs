//! The client side: connect to a daemon's control socket, send requests, and
//! `cachefs ctl DST COMMAND` (printing the answers for people, or `--json`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::ControlError;
use crate::cache::budget::{self, MinFree, human};

/// One connection to a daemon.
pub struct Conn {
    socket: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    /// Connects to the daemon serving `dst`.
    pub fn connect(dst: &Path) -> Result<Conn, ControlError> {
        let socket = super::socket_path(dst);
        let stream = UnixStream::connect(&socket).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => ControlError::Refused {
                socket: socket.clone(),
                why: format!("permission denied opening the socket ({e})"),
            },
            _ => ControlError::NoDaemon {
                socket: socket.clone(),
                source: e,
            },
        })?;
        let _ = stream.set_read_timeout(Some(super::IDLE * 4));
        let reader = BufReader::new(stream.try_clone().map_err(ControlError::Io)?);
        Ok(Conn {
            socket,
            stream,
            reader,
        })
    }

    /// Sends `req` and returns the answer when it is `ok`; a daemon's error otherwise.
    pub fn call(&mut self, req: &Value) -> Result<Value, ControlError> {
        let mut line = req.to_string();
        line.push('\n');
        // A refusing daemon answers at once and closes: its answer may be waiting
        // even when the write failed (EPIPE).
        let written = self.stream.write_all(line.as_bytes());
        let mut reply = String::new();
        let read = self.reader.read_line(&mut reply);
        if let Err(e) = written
            && !matches!(read, Ok(n) if n > 0)
        {
            return Err(ControlError::Io(e));
        }
        match read {
            Ok(0) => {
                return Err(ControlError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(ControlError::Io(e)),
        }
        let v: Value = serde_json::from_str(&reply)
            .map_err(|e| ControlError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(v);
        }
        let msg = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon answered with an error")
            .to_string();
        if msg.starts_with("permission denied") {
            return Err(ControlError::Refused {
                socket: self.socket.clone(),
                why: msg,
            });
        }
        Err(ControlError::Daemon(msg))
    }
}

/// One request on a new connection.
pub fn call(dst: &Path, req: &Value) -> Result<Value, ControlError> {
    Conn::connect(dst)?.call(req)
}

/// The mount-relative form of `p`: a path through the mount (absolute, or relative to
/// the current directory, when it leads into the mount), else a path from the mount's
/// root (`/videos/a.mp4` and `videos/a.mp4` alike).
pub fn rel_to_mount(mountpoint: &Path, p: &Path) -> Result<PathBuf, ControlError> {
    let through = if p.is_absolute() {
        Some(p.to_path_buf())
    } else {
        std::env::current_dir().ok().map(|cwd| cwd.join(p))
    };
    let inside = through.and_then(|abs| {
        // Canonical when it exists (symlinks to the mount, `..`); as given otherwise.
        let abs = std::fs::canonicalize(&abs).unwrap_or(abs);
        abs.strip_prefix(mountpoint).ok().map(Path::to_path_buf)
    });
    let rest = inside.unwrap_or_else(|| p.to_path_buf());
    super::mount_rel(&rest).map_err(ControlError::Usage)
}

/// The daemon's mountpoint (from `info`).
pub fn mountpoint(conn: &mut Conn) -> Result<PathBuf, ControlError> {
    let info = conn.call(&json!({"cmd": "info"}))?;
    Ok(PathBuf::from(
        info.get("mountpoint")
            .and_then(Value::as_str)
            .unwrap_or("/"),
    ))
}

/// What `cachefs ctl` was asked to do (see `cli::CtlCommand`).
#[derive(Debug, Clone, PartialEq)]
pub enum Ctl {
    Info,
    Stats,
    State {
        paths: Vec<PathBuf>,
        recursive: bool,
    },
    Retry,
    Revalidate {
        paths: Vec<PathBuf>,
    },
    Pin {
        paths: Vec<PathBuf>,
    },
    Unpin {
        paths: Vec<PathBuf>,
    },
    Evict {
        paths: Vec<PathBuf>,
        recursive: bool,
    },
    Set {
        name: String,
        value: String,
    },
}

/// Turns `cachefs ctl DST set NAME VALUE` into a request; the error is one line.
pub fn set_request(name: &str, value: &str) -> Result<Value, String> {
    let none = matches!(value.trim(), "none" | "off" | "unlimited");
    let size = |flag: &str| -> Result<Value, String> {
        if none {
            return Ok(json!({"cmd": "set", "name": flag, "bytes": null}));
        }
        match budget::parse_size(value) {
            Ok(0) => Err(format!(
                "--{flag} '{value}' must be more than 0 (or 'none')"
            )),
            Ok(n) => Ok(json!({"cmd": "set", "name": flag, "bytes": n})),
            Err(why) => Err(format!(
                "--{flag} '{value}' is not a size ({why}); write e.g. 20G, 500M, or none"
            )),
        }
    };
    match name {
        "cache-size" | "max-dirty" => size(name),
        "min-free" => {
            if none {
                return Ok(json!({"cmd": "set", "name": name, "bytes": null}));
            }
            match budget::parse_min_free(value) {
                Ok(MinFree::Percent(p)) => Ok(json!({"cmd": "set", "name": name, "percent": p})),
                Ok(MinFree::Bytes(0)) => Err(format!(
                    "--min-free '{value}' must be more than 0 (or 'none')"
                )),
                Ok(MinFree::Bytes(b)) => Ok(json!({"cmd": "set", "name": name, "bytes": b})),
                Err(why) => Err(format!(
                    "--min-free '{value}' is not a size or a percentage ({why}); write e.g. 10G or 5%"
                )),
            }
        }
        "revalidate" => {
            let d = crate::config::parse_duration("revalidate", value)?;
            Ok(json!({"cmd": "set", "name": name, "secs": d.as_secs_f64()}))
        }
        other => Err(format!(
            "'{other}' cannot be changed at run time; use cache-size, min-free, max-dirty or revalidate"
        )),
    }
}

/// `cachefs ctl DST ...`: the exit status (0 done, 1 failed, 2 bad arguments).
pub fn run_ctl(dst: &Path, ctl: &Ctl, json_out: bool) -> i32 {
    match ctl_inner(dst, ctl, json_out) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cachefs: {e}");
            e.exit_code()
        }
    }
}

fn rels(conn: &mut Conn, paths: &[PathBuf]) -> Result<Vec<String>, ControlError> {
    let mnt = mountpoint(conn)?;
    let mut out = Vec::new();
    for p in paths {
        out.push(rel_to_mount(&mnt, p)?.to_string_lossy().into_owned());
    }
    if out.is_empty() {
        out.push(String::new());
    }
    Ok(out)
}

fn ctl_inner(dst: &Path, ctl: &Ctl, json_out: bool) -> Result<i32, ControlError> {
    let mut conn = Conn::connect(dst)?;
    let print = |v: &Value| {
        if json_out {
            println!("{v}");
        }
    };
    match ctl {
        Ctl::Info => {
            let v = conn.call(&json!({"cmd": "info"}))?;
            print(&v);
            if !json_out {
                let opt = |k: &str, f: &dyn Fn(&Value) -> String| {
                    v.get(k)
                        .filter(|x| !x.is_null())
                        .map_or("none".to_string(), f)
                };
                let size = |x: &Value| human(x.as_u64().unwrap_or(0));
                println!("pid:          {}", v["pid"]);
                println!("mountpoint:   {}", v["mountpoint"].as_str().unwrap_or(""));
                println!("dst:          {}", v["dst"].as_str().unwrap_or(""));
                println!("cache-size:   {}", opt("cache_size", &size));
                println!(
                    "min-free:     {}",
                    opt("min_free", &|x| x.as_str().unwrap_or("").to_string())
                );
                println!("max-dirty:    {}", opt("max_dirty", &size));
                println!(
                    "revalidate:   {}s",
                    v["revalidate_secs"].as_f64().unwrap_or(0.0)
                );
            }
        }
        Ctl::Stats => {
            let v = conn.call(&json!({"cmd": "stats"}))?;
            println!("{v}");
        }
        Ctl::State { paths, recursive } => {
            let mut all = Vec::new();
            for p in rels(&mut conn, paths)? {
                let v = conn.call(&json!({"cmd": "state", "path": p, "recursive": recursive}))?;
                if let Some(a) = v["paths"].as_array() {
                    all.extend(a.iter().cloned());
                }
            }
            if json_out {
                println!("{}", json!({"paths": all}));
            } else {
                for e in &all {
                    let path = format!("/{}", e["path"].as_str().unwrap_or(""));
                    match e.get("state").and_then(Value::as_array) {
                        Some(w) => {
                            let w: Vec<&str> = w.iter().filter_map(Value::as_str).collect();
                            println!("{path}\t{}", w.join(", "));
                        }
                        None => println!("{path}\terror: {}", e["error"].as_str().unwrap_or("")),
                    }
                }
            }
            if all.iter().any(|e| e.get("error").is_some()) {
                return Ok(1);
            }
        }
        Ctl::Retry => {
            let v = conn.call(&json!({"cmd": "retry"}))?;
            print(&v);
            if !json_out {
                println!("retrying {} failed writeback ops now", v["retried"]);
            }
        }
        Ctl::Revalidate { paths } => {
            for p in rels(&mut conn, paths)? {
                let v = conn.call(&json!({"cmd": "revalidate", "path": p}))?;
                print(&v);
                if !json_out {
                    println!("/{p}: compared with src at its next use");
                }
            }
        }
        Ctl::Pin { paths } | Ctl::Unpin { paths } => {
            let on = matches!(ctl, Ctl::Pin { .. });
            let cmd = if on { "pin" } else { "unpin" };
            for p in rels(&mut conn, paths)? {
                let v = conn.call(&json!({"cmd": cmd, "path": p}))?;
                print(&v);
                if !json_out {
                    let now = v["pinned"].as_bool() == Some(true);
                    println!("/{p}: {}", if now { "pinned" } else { "not pinned" });
                }
            }
        }
        Ctl::Evict { paths, recursive } => {
            let ps = rels(&mut conn, paths)?;
            let v = conn.call(&json!({"cmd": "evict", "paths": ps, "recursive": recursive}))?;
            print(&v);
            if !json_out {
                print_evicted(&v);
            }
            if v["errors"].as_array().is_some_and(|a| !a.is_empty()) {
                return Ok(1);
            }
        }
        Ctl::Set { name, value } => {
            let req = set_request(name, value).map_err(ControlError::Usage)?;
            let v = conn.call(&req)?;
            print(&v);
            if !json_out {
                println!("{name} is now {value}");
            }
        }
    }
    Ok(0)
}

/// The lines of an `evict` answer.
pub fn print_evicted(v: &Value) {
    println!(
        "evicted {} files ({})",
        v["evicted"],
        human(v["freed_bytes"].as_u64().unwrap_or(0))
    );
    for k in v["kept"].as_array().into_iter().flatten() {
        println!(
            "kept /{}: {}",
            k["path"].as_str().unwrap_or(""),
            k["why"].as_str().unwrap_or("")
        );
    }
    for k in v["errors"].as_array().into_iter().flatten() {
        eprintln!(
            "cachefs: cannot evict /{}: {}",
            k["path"].as_str().unwrap_or(""),
            k["error"].as_str().unwrap_or("")
        );
    }
}
