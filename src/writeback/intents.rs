//! Intents: the paths of changes being made on dst whose journal op is not recorded
//! yet (`dst/.cachefs-state/writeback/intents`).
//!
//! The core changes dst first and journals the op after (the op names dst's new
//! object). A crash between the two left dst changed with no op: a file created,
//! removed or renamed in the mount that src never heard of. So before changing dst, the
//! core writes the paths it is about to touch here ([`Intents::begin`]) and ends the
//! intent once the op is journaled ([`IntentGuard`] drop). At the next start, every path
//! left here gets a `sync` op (src is made to match dst's view at that path, whatever
//! the interrupted change did or did not do), journaled durably before the file is
//! emptied.
//!
//! Invariants:
//! - A line is one hex-encoded path and a newline, appended with one write and not
//!   synced: a process crash keeps it (page cache); after a power loss the dst change
//!   it guards was not durable either. Undecodable lines (a torn tail) are ignored.
//! - The file is emptied whenever no intent is open (cheap: one ftruncate), so what a
//!   start finds is only what was in flight at the crash, plus at most the lines of
//!   intents that ended while others were still open.
//! - A `sync` of a path src already matches is a no-op upload at worst: extra lines
//!   cost time, never correctness.
//!
//! Lock order: the intents mutex is a leaf (never held with the writeback state).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fs::change::{EndIntent, IntentGuard};
use crate::fs::origin::{hex, unhex};

const FILE: &str = "intents";

struct State {
    file: File,
    /// Intents begun and not yet ended.
    open: usize,
    /// Whether anything was written since the file was last emptied.
    written: bool,
}

/// The intent file of one dst, open for appending.
pub(crate) struct Intents {
    state: Mutex<State>,
}

impl Intents {
    /// Opens the intent file in the journal folder `dir` and returns the paths it still
    /// holds (changes a crash interrupted). The caller journals them, then calls
    /// [`Intents::clear`].
    pub(crate) fn open(dir: &Path) -> io::Result<(Intents, Vec<PathBuf>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(dir.join(FILE))?;
        let mut text = String::new();
        // Invalid UTF-8 can only be a torn write: hex lines are ASCII.
        let left = match file.read_to_string(&mut text) {
            Ok(_) => text
                .lines()
                .filter(|l| !l.is_empty())
                .filter_map(unhex)
                .map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
                .collect(),
            Err(_) => Vec::new(),
        };
        let intents = Intents {
            state: Mutex::new(State {
                file,
                open: 0,
                written: true,
            }),
        };
        Ok((intents, left))
    }

    /// Empties the file (the leftovers returned by `open` are journaled).
    pub(crate) fn clear(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.open == 0 {
            st.file.set_len(0)?;
            st.written = false;
        }
        Ok(())
    }

    /// Notes that a change of `paths` on dst is about to be made; ended by dropping the
    /// guard after its op is journaled.
    pub(crate) fn begin(&self, paths: &[&Path]) -> io::Result<IntentGuard<'_>> {
        let mut line = String::new();
        for p in paths {
            line.push_str(&hex(p.as_os_str().as_bytes()));
            line.push('\n');
        }
        let mut st = self.state.lock().unwrap();
        st.file.write_all(line.as_bytes())?;
        st.written = true;
        st.open += 1;
        Ok(IntentGuard::new(self))
    }

    fn end(&self) {
        let mut st = self.state.lock().unwrap();
        st.open -= 1;
        if st.open == 0 && st.written {
            // Every change noted here is journaled now.
            if st.file.set_len(0).is_ok() {
                st.written = false;
            }
        }
    }
}

impl EndIntent for Intents {
    fn end_intent(&self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_intents_survive_a_reopen_and_ended_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let (i, left) = Intents::open(d.path()).unwrap();
        assert!(left.is_empty());
        i.clear().unwrap();
        drop(i.begin(&[Path::new("done")]).unwrap());
        let a = i
            .begin(&[Path::new("a/new file"), Path::new("b\nodd")])
            .unwrap();
        let b = i.begin(&[Path::new("c")]).unwrap();
        drop(b);
        std::mem::forget(a); // the crash: never ended
        let (_, left) = Intents::open(d.path()).unwrap();
        assert_eq!(
            left,
            vec![
                PathBuf::from("a/new file"),
                PathBuf::from("b\nodd"),
                PathBuf::from("c")
            ]
        );
    }

    #[test]
    fn a_torn_tail_is_ignored_and_clear_empties() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), "61\n6\nzz\n62").unwrap();
        let (i, left) = Intents::open(d.path()).unwrap();
        assert_eq!(left, vec![PathBuf::from("a"), PathBuf::from("b")]);
        i.clear().unwrap();
        assert_eq!(std::fs::metadata(d.path().join(FILE)).unwrap().len(), 0);
    }
}
