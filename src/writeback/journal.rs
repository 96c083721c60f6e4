//! The on-disk journal: `dst/.cachefs-state/writeback/journal`, a text file of lines
//!
//! ```text
//! <crc32 of body, 8 hex digits> <body>\n
//! body := "cachefs-journal 1"                           first line (header)
//!       | "R" seq unix_ms kind id path [id2 path2]      op recorded
//!       | "D" seq                                       op applied on src
//!       | "F" seq attempts unix_ms errno message        op parked as failed (latest wins)
//! ```
//!
//! `id` is the dst identity of the object the op refers to at that path (`ino` or
//! `ino.btime_sec.btime_nsec`), or `-` when the op has none (see `op::id_paths`).
//! Fields are separated by one space. Paths are written with a leading `/` ("/" is the
//! mount root) and every byte outside `!`..`~` plus `%` is percent-encoded (`%20`), so any
//! file name, including newlines and non-UTF-8 bytes, round-trips. The message of an `F`
//! line is encoded the same way. `seq` is strictly increasing across `R` lines.
//!
//! Durability: a line is written with one `write(2)` on an `O_APPEND` file; a failed or
//! short write is truncated back, so a line is either whole or absent. Loading stops at
//! the first line whose checksum or syntax is wrong (a torn tail after power loss: never
//! acknowledged) and truncates the file there. `D` and `F` lines are not fsynced:
//! losing them only replays an op again, and every replay is idempotent.
//!
//! Compaction rewrites the live records (pending `R` lines and their latest `F`) to
//! `journal.tmp`, fsyncs it, renames it over `journal` and fsyncs the folder.

use crate::sys::state_file;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::at::Id;
use super::op;
use crate::fs::change::Op;

const HEADER: &str = "cachefs-journal 1";

/// The journal folder under dst.
pub(crate) fn dir(dst: &Path) -> PathBuf {
    dst.join(crate::fs::names::STATE_DIR).join("writeback")
}

/// One journal line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Op {
        seq: u64,
        ms: u64,
        op: Op,
        ids: [Option<Id>; 2],
    },
    Done {
        seq: u64,
    },
    Failed {
        seq: u64,
        fail: FailInfo,
    },
}

/// Why an op is parked as failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailInfo {
    pub attempts: u32,
    pub ms: u64,
    pub errno: i32,
    pub message: String,
}

/// An op that was recorded and not applied yet, as loaded from disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Live {
    pub ms: u64,
    pub op: Op,
    pub ids: [Option<Id>; 2],
    pub fail: Option<FailInfo>,
}

// ---------------------------------------------------------------- encoding

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub(crate) fn encode_bytes(out: &mut String, b: &[u8]) {
    for &c in b {
        if c > b' ' && c < 0x7f && c != b'%' {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
}

pub(crate) fn decode_bytes(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn encode_path(out: &mut String, p: &Path) {
    out.push('/');
    encode_bytes(out, p.as_os_str().as_bytes());
}

fn decode_path(s: &str) -> Option<PathBuf> {
    let b = decode_bytes(s.strip_prefix('/')?)?;
    let p = PathBuf::from(OsString::from_vec(b));
    op::normalize_path(&p).filter(|n| *n == p)
}

fn encode_id(out: &mut String, id: Option<Id>) {
    match id {
        None => out.push('-'),
        Some(Id { ino, btime: None }) => out.push_str(&ino.to_string()),
        Some(Id {
            ino,
            btime: Some((s, n)),
        }) => out.push_str(&format!("{ino}.{s}.{n}")),
    }
}

fn decode_id(s: &str) -> Option<Option<Id>> {
    if s == "-" {
        return Some(None);
    }
    let f: Vec<&str> = s.split('.').collect();
    let ino = f[0].parse().ok()?;
    let btime = match f.len() {
        1 => None,
        3 => Some((f[1].parse().ok()?, f[2].parse().ok()?)),
        _ => return None,
    };
    Some(Some(Id { ino, btime }))
}

fn line(body: &str) -> String {
    format!("{:08x} {body}\n", crc32(body.as_bytes()))
}

pub(crate) fn encode(r: &Record) -> String {
    let mut b = String::new();
    match r {
        Record::Op {
            seq,
            ms,
            op: o,
            ids,
        } => {
            b.push_str(&format!("R {seq} {ms} {}", op::kind(o)));
            for (i, p) in op::paths(o).into_iter().enumerate() {
                b.push(' ');
                encode_id(&mut b, ids[i]);
                b.push(' ');
                encode_path(&mut b, p);
            }
        }
        Record::Done { seq } => b.push_str(&format!("D {seq}")),
        Record::Failed { seq, fail } => {
            b.push_str(&format!(
                "F {seq} {} {} {} ",
                fail.attempts, fail.ms, fail.errno
            ));
            encode_bytes(&mut b, fail.message.as_bytes());
        }
    }
    line(&b)
}

/// Parse one line (without its `\n`). `None` if torn or malformed.
pub(crate) fn decode(l: &str) -> Option<Option<Record>> {
    let (crc, body) = l.split_once(' ')?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32(body.as_bytes()) {
        return None;
    }
    if body == HEADER {
        return Some(None);
    }
    let f: Vec<&str> = body.split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    let rec = match *f.first()? {
        "R" if f.len() == 6 || f.len() == 8 => Record::Op {
            seq: num(1)?,
            ms: num(2)?,
            op: op::from_parts(
                f[3],
                decode_path(f[5])?,
                match f.get(7) {
                    Some(s) => Some(decode_path(s)?),
                    None => None,
                },
            )?,
            ids: [
                decode_id(f[4])?,
                match f.get(6) {
                    Some(s) => decode_id(s)?,
                    None => None,
                },
            ],
        },
        "D" if f.len() == 2 => Record::Done { seq: num(1)? },
        "F" if f.len() == 6 => Record::Failed {
            seq: num(1)?,
            fail: FailInfo {
                attempts: num(2)? as u32,
                ms: num(3)?,
                errno: f[4].parse().ok()?,
                message: String::from_utf8_lossy(&decode_bytes(f[5])?).into_owned(),
            },
        },
        _ => return None,
    };
    Some(Some(rec))
}

/// Parse a whole journal: the live ops by seq, the next free seq, the byte length of
/// the valid prefix, and the number of valid lines.
pub(crate) fn parse(data: &[u8]) -> (BTreeMap<u64, Live>, u64, u64, u64) {
    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut next = 1;
    let mut valid = 0u64;
    let mut lines = 0u64;
    let mut rest = data;
    while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
        let Ok(text) = std::str::from_utf8(&rest[..nl]) else {
            break;
        };
        let Some(rec) = decode(text) else { break };
        match rec {
            None => {}
            Some(Record::Op { seq, ms, op, ids }) => {
                next = next.max(seq + 1);
                live.insert(
                    seq,
                    Live {
                        ms,
                        op,
                        ids,
                        fail: None,
                    },
                );
            }
            Some(Record::Done { seq }) => {
                live.remove(&seq);
            }
            Some(Record::Failed { seq, fail }) => {
                if let Some(l) = live.get_mut(&seq) {
                    l.fail = Some(fail);
                }
            }
        }
        valid += nl as u64 + 1;
        lines += 1;
        rest = &rest[nl + 1..];
    }
    (live, next, valid, lines)
}

/// Read and parse the journal of `dst` without modifying anything (for `status`).
pub(crate) fn read(dst: &Path) -> io::Result<(BTreeMap<u64, Live>, u64)> {
    let mut data = Vec::new();
    match File::open(dir(dst).join("journal")) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let (live, next, _, _) = parse(&data);
    Ok((live, next))
}

// ---------------------------------------------------------------- the open journal

/// The journal open for appending. Owned by the writeback state mutex.
pub(crate) struct Journal {
    dir: PathBuf,
    /// Shared so a group commit can fdatasync outside the state lock.
    pub file: Arc<File>,
    len: u64,
    /// Lines in the file (for the compaction heuristic).
    pub lines: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

impl Journal {
    /// Open (creating if needed) and load the journal of `dst`; truncates a torn tail.
    /// One writer per dst: the daemon holds dst's lock ([`crate::dst_lock`]) first.
    pub(crate) fn open(dst: &Path) -> io::Result<(Journal, BTreeMap<u64, Live>, u64)> {
        let dir = dir(dst);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("journal");
        let mut file = open_append(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (live, next, valid, lines) = parse(&data);
        if valid < data.len() as u64 {
            log::warn!(
                "writeback journal {}: dropping {} bytes of torn tail",
                path.display(),
                data.len() as u64 - valid
            );
            file.set_len(valid)?;
            file.sync_all()?;
        }
        let mut j = Journal {
            dir,
            file: Arc::new(file),
            len: valid,
            lines,
        };
        if valid == 0 {
            j.append(&line(HEADER))?;
            j.file.sync_all()?;
            sync_dir(&j.dir)?;
        }
        Ok((j, live, next))
    }

    /// Append already-encoded lines with one write; all or nothing.
    pub(crate) fn append(&mut self, text: &str) -> io::Result<()> {
        let r = (&*self.file).write(text.as_bytes());
        match r {
            Ok(n) if n == text.len() => {
                self.len += n as u64;
                self.lines += text.matches('\n').count() as u64;
                Ok(())
            }
            other => {
                let _ = self.file.set_len(self.len);
                Err(match other {
                    Err(e) => e,
                    Ok(_) => io::Error::new(io::ErrorKind::WriteZero, "short journal write"),
                })
            }
        }
    }

    /// Replace the journal by `records` (the live set); durable when this returns.
    pub(crate) fn compact(&mut self, records: &[Record]) -> io::Result<()> {
        let mut text = line(HEADER);
        for r in records {
            text.push_str(&encode(r));
        }
        let path = self.dir.join("journal");
        state_file::replace_with(&path, OsStr::new("journal.tmp"), text.as_bytes())?;
        self.file = Arc::new(open_append(&path)?);
        self.len = text.len() as u64;
        self.lines = text.matches('\n').count() as u64;
        Ok(())
    }
}

/// Runs of this process's and earlier daemons' writeback on this dst: the id in every
/// temp name this run writes to src, and the ids of earlier runs whose leftovers it may
/// remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Runs {
    /// This run's id: 128 random bits (getrandom), base32; new at every start and never
    /// taken from dst, so daemons started from copies of one dst (cloned machines
    /// sharing a bucket) never write the same temp name.
    pub current: String,
    /// Earlier runs of this dst *on this machine* (newest first): a crash may have left
    /// their temp files on src, which ops they left pending reclaim (`replay`).
    pub reclaim: Vec<String>,
}

/// Runs kept in the `runs` file (older ones are forgotten: a leftover of a run that
/// many starts ago stays on src, hidden by its reserved name).
pub(crate) const RUNS_KEPT: usize = 8;

/// Records a new run in `writeback/runs` (lines `<id> <machine>`, oldest first,
/// durable when this returns) and returns it with this machine's earlier runs. An id
/// of the older single-id format (`writeback/instance`, shared by clones) is taken in
/// as a run of this machine once, then that file goes.
pub(crate) fn new_run(dst: &Path) -> io::Result<Runs> {
    let d = dir(dst);
    let machine = machine_id();
    let path = d.join("runs");
    let mut lines: Vec<(String, String)> = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| {
                let (id, m) = l.split_once(' ')?;
                Some((id.to_string(), m.to_string()))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let legacy = d.join("instance");
    if let Ok(old) = std::fs::read_to_string(&legacy)
        && !old.trim().is_empty()
    {
        lines.insert(0, (old.trim().to_string(), machine.clone()));
    }
    let reclaim = lines
        .iter()
        .rev()
        .filter(|(_, m)| *m == machine)
        .map(|(id, _)| id.clone())
        .collect();
    let current = random_id()?;
    lines.push((current.clone(), machine));
    let skip = lines.len().saturating_sub(RUNS_KEPT);
    let text: String = lines[skip..]
        .iter()
        .map(|(id, m)| format!("{id} {m}\n"))
        .collect();
    state_file::replace_with(&path, OsStr::new("runs.tmp"), text.as_bytes())?;
    if std::fs::remove_file(&legacy).is_ok() {
        sync_dir(&d)?;
    }
    Ok(Runs { current, reclaim })
}

/// 128 bits from getrandom(2), as 26 characters of lowercase base32 (RFC 4648
/// alphabet): short, and the same on case-insensitive src backends.
pub(crate) fn random_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let v = u128::from_be_bytes(b);
    Ok((0..26)
        .map(|i| ALPHABET[((v >> (i * 5)) & 31) as usize] as char)
        .collect())
}

/// This machine, as written next to a run id: `/etc/machine-id` (per installation),
/// else the host name; no blanks.
fn machine_id() -> String {
    let id = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    id.split_whitespace().collect::<Vec<_>>().join("_")
}

fn sync_dir(d: &Path) -> io::Result<()> {
    File::open(d)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_random_short_and_new_at_every_start() {
        let a = random_id().unwrap();
        assert_eq!(a.len(), 26);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
        );
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| random_id().unwrap()).collect();
        assert_eq!(ids.len(), 1000);

        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(dst.path())).unwrap();
        // The older format's id, shared by clones of this dst.
        std::fs::write(dir(dst.path()).join("instance"), "0badc0de").unwrap();
        let first = new_run(dst.path()).unwrap();
        assert_eq!(first.reclaim, ["0badc0de"]);
        assert!(!dir(dst.path()).join("instance").exists());
        let second = new_run(dst.path()).unwrap();
        assert_ne!(second.current, first.current);
        assert_eq!(second.reclaim, [first.current.clone(), "0badc0de".into()]);
        // Another machine's runs (a clone's, recorded in a copy) are not reclaimed.
        let runs = dir(dst.path()).join("runs");
        let mut text = std::fs::read_to_string(&runs).unwrap();
        text.push_str("othermachinerun other-machine-id\n");
        std::fs::write(&runs, text).unwrap();
        let third = new_run(dst.path()).unwrap();
        assert!(
            !third.reclaim.contains(&"othermachinerun".to_string()),
            "{third:?}"
        );
        assert_eq!(third.reclaim[0], second.current);
        for _ in 0..RUNS_KEPT * 2 {
            new_run(dst.path()).unwrap();
        }
        let kept = std::fs::read_to_string(&runs).unwrap();
        assert_eq!(kept.lines().count(), RUNS_KEPT, "{kept}");
    }
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn records_round_trip_with_odd_names() {
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"d ir/f%\n\xff\x01x"));
        let recs = [
            Record::Op {
                seq: 7,
                ms: 123,
                op: Op::Rename {
                    from: odd.clone(),
                    to: PathBuf::from("b"),
                    exchange: true,
                },
                ids: [
                    Some(Id {
                        ino: 5,
                        btime: Some((-1, 999)),
                    }),
                    Some(Id {
                        ino: 6,
                        btime: None,
                    }),
                ],
            },
            Record::Op {
                seq: 8,
                ms: 1,
                op: Op::SetAttr {
                    path: PathBuf::new(),
                },
                ids: [None, None],
            },
            Record::Done { seq: 7 },
            Record::Failed {
                seq: 8,
                fail: FailInfo {
                    attempts: 3,
                    ms: 9,
                    errno: 13,
                    message: "Permission denied (os error 13)\n".into(),
                },
            },
        ];
        for r in &recs {
            let l = encode(r);
            assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
            assert_eq!(decode(l.trim_end_matches('\n')), Some(Some(r.clone())));
        }
    }

    #[test]
    fn torn_and_corrupt_lines_end_the_valid_prefix() {
        let mut text = line(HEADER);
        text.push_str(&encode(&Record::Op {
            seq: 1,
            ms: 0,
            op: Op::Write { path: "a".into() },
            ids: [None, None],
        }));
        let good = text.len() as u64;
        let bad = encode(&Record::Op {
            seq: 2,
            ms: 0,
            op: Op::Write { path: "b".into() },
            ids: [None, None],
        })
        .replace("/b", "/c");
        text.push_str(&bad);
        let (live, next, valid, _) = parse(text.as_bytes());
        assert_eq!((live.len(), next, valid), (1, 2, good));
        let (_, _, valid, _) = parse(&text.as_bytes()[..text.len() - 1]);
        assert_eq!(valid, good);
        assert!(decode("0000 R 1 1 write - ../x").is_none());
    }

    #[test]
    fn open_truncates_torn_tail() {
        let t = tempfile::tempdir().unwrap();
        {
            let (mut j, live, next) = Journal::open(t.path()).unwrap();
            assert!(live.is_empty() && next == 1);
            j.append(&encode(&Record::Op {
                seq: 1,
                ms: 5,
                op: Op::Mkdir { path: "d".into() },
                ids: [None, None],
            }))
            .unwrap();
        }
        let jp = dir(t.path()).join("journal");
        let mut f = OpenOptions::new().append(true).open(&jp).unwrap();
        f.write_all(b"deadbeef R 2 0 wri").unwrap();
        let (_, live, next) = Journal::open(t.path()).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(next, 2);
        assert!(std::fs::read_to_string(&jp).unwrap().ends_with('\n'));
    }
}
