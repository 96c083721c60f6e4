//! Documentation generated from the clap definitions in `args`, so neither can drift
//! from the flags: the man page cachefs(1) (plus hand-written sections clap does not
//! model) and the shell completion scripts. Tests compare both with the files in docs/.

use super::args::{Cli, CompletionShell};

/// The completion script for `shell`, from the clap definitions (so it cannot drift).
pub fn completions(shell: CompletionShell) -> String {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let sh = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(sh, &mut Cli::command(), "cachefs", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The man page cachefs(1), in roff: clap_mangen's sections from the clap definitions
/// (so every flag is there, with its help text), plus the sections a daemon's page
/// needs that clap does not model.
pub fn man_page() -> String {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd);
    // .TH by hand: clap_mangen drops an empty date field, which shifts the others (no
    // build date: the page is reproducible).
    let mut page = concat!(
        ".TH CACHEFS 1 \"\" \"cachefs ",
        env!("CARGO_PKG_VERSION"),
        "\" \"User Commands\"\n"
    )
    .to_string();
    let mut out = Vec::new();
    let rendered = man.render_name_section(&mut out).and_then(|()| {
        out.extend_from_slice(MAN_SYNOPSIS.as_bytes());
        man.render_description_section(&mut out)?;
        man.render_options_section(&mut out)
    });
    rendered.expect("writing to a Vec cannot fail");
    page.push_str(&String::from_utf8_lossy(&out));
    page.push_str(MAN_EXTRA);
    page
}

/// The man page's synopsis (clap's lists every flag without its value).
const MAN_SYNOPSIS: &str = r#".SH SYNOPSIS
\fBcachefs\fR \fB\-src\fR \fIDIR\fR \fB\-dst\fR \fIDIR\fR \fB\-mountpoint\fR \fIDIR\fR [\fIFLAGS\fR]
.br
\fBcachefs status\fR \fIDST\fR [\fB\-\-json\fR | \fB\-\-watch\fR [\fB\-\-interval\fR \fIDURATION\fR] [\fB\-\-count\fR \fIN\fR]]
.br
\fBcachefs ctl\fR \fIDST\fR [\fB\-\-json\fR] \fICOMMAND\fR [\fIARGS\fR]
.br
\fBcachefs warmup\fR [\fB\-\-recursive\fR] [\fB\-\-dst\fR \fIDST\fR [\fB\-\-evict\fR]] \fIPATH\fR...
"#;

/// The man page's hand-written sections (roff). Flags are described by clap.
const MAN_EXTRA: &str = r#".SH "GO-STYLE FLAGS"
Every flag can be written the GoCacheFS (Go \fBflag\fR package) way or the GNU way:
\fB\-src /a\fR, \fB\-src=/a\fR, \fB\-\-src /a\fR and \fB\-\-src=/a\fR are the same;
boolean flags also accept \fB\-w=true\fR and \fB\-w=false\fR; \fB\-o\fR also takes
libfuse's attached form \fB\-oallow_other\fR.
.PP
Durations take a unit, as rclone's flags do: \fB500ms\fR, \fB30s\fR, \fB5m\fR,
\fB1h\fR, \fB1d\fR, \fB1h30m\fR (also \fBus\fR, \fBns\fR); a plain number is
seconds, fractions allowed. Sizes take binary units: \fB4K\fR, \fB500M\fR,
\fB20G\fR, \fB1T\fR.
.SH COMMANDS
.TP
\fBcachefs status\fR \fIDST\fR [\fB\-\-json\fR]
Report the state kept in a cache directory, with or without a running daemon:
src online or offline, the writeback queue (pending and failed operations), the
cache budget. \fB\-\-json\fR prints one machine\-readable object. Exit status 0 when
no writeback operation has failed, 1 when failed operations exist, 2 when the
journal cannot be read. An offline src is shown, not judged: the daemon learns that
src is back only at its next call to it.
.TP
\fBcachefs status\fR \fIDST\fR \fB\-\-watch\fR [\fB\-\-interval\fR \fIDURATION\fR] [\fB\-\-count\fR \fIN\fR]
Live rates from the running daemon, over its control channel: cache hits and misses
per second, bytes fetched from src and uploaded to it per second, the writeback queue
(pending, failed, dirty bytes), the mean src call latency, src online or not.
Redrawn in place on a terminal every \fB\-\-interval\fR (default 1s); one plain line
per interval otherwise. \fB\-\-count\fR stops after \fIN\fR refreshes.
.TP
\fBcachefs ctl\fR \fIDST\fR [\fB\-\-json\fR] \fICOMMAND\fR
Steer the daemon serving \fIDST\fR without unmounting, over the Unix socket
\fIDST\fB/.cachefs\-state/control.sock\fR (mode 0600; the daemon also checks the
caller's uid with SO_PEERCRED: only root and the user it runs as are answered).
\fIPATH\fRs are paths through the mount, or relative to the mount's root.
Commands: \fBinfo\fR (pid, mountpoint, limits in force); \fBstats\fR (counters, JSON);
\fBstate\fR [\fB\-\-recursive\fR] \fIPATH\fR... (\fBcached\fR, \fBpartial\fR \fIN\fR%,
\fBdirty\fR, \fBnot cached\fR; \fBpending upload\fR, \fBpinned\fR); \fBretry\fR (retry
failed writeback ops now); \fBrevalidate\fR \fIPATH\fR... (compare with src at next use);
\fBpin\fR / \fBunpin\fR \fIPATH\fR...; \fBevict\fR [\fB\-\-recursive\fR] \fIPATH\fR...
(drop clean copies); \fBset\fR \fBcache\-size\fR|\fBmin\-free\fR|\fBmax\-dirty\fR
\fISIZE\fR|\fBnone\fR, \fBset revalidate\fR \fIDURATION\fR (at once, no remount;
a smaller \fBcache\-size\fR evicts down to it within a second).
\fB\-\-json\fR prints the daemon's answers. Exit status 0 done, 1 failed or refused,
2 bad arguments.
.TP
\fBcachefs warmup\fR [\fB\-\-recursive\fR] \fIPATH\fR...
Fetch files into dst ahead of use by reading them whole through the mount, so the
daemon's own locks and cache budget apply. A progress bar on a terminal (files,
bytes, rate, ETA), plain lines otherwise. Exit status 1 if any file failed (a file
that does not fit the budget fails with ENOSPC; a src error with EIO).
With \fB\-\-dst\fR \fIDST\fR, a file larger than the daemon's \fB\-\-cache\-size\fR
fails at once, unread. \fB\-\-evict\fR \fB\-\-dst\fR \fIDST\fR drops the clean cached
copies of the same files instead (dirty, pending, pinned and open files stay, and are
listed).
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Unmount (lazily, with a warning, if the mount is busy), drain the writeback queue for
at most \fB\-\-drain\-timeout\fR, keep the rest in the journal, exit 0. A second
signal exits at once. \fBumount\fR \fIMOUNTPOINT\fR does the same.
.TP
\fBSIGHUP\fR
Reopen src's root, so that a src mounted anew at its path is used from then on, and
log the status summary. Never unmounts (\fBsystemctl reload\fR).
.TP
\fBSIGUSR1\fR
Log the status summary: src online or offline, the writeback queue, failed operations.
.SH "EXIT STATUS"
.TP
\fB0\fR
Clean stop.
.TP
\fB1\fR
Runtime failure (the mount failed, dst unusable, the metrics address taken).
.TP
\fB2\fR
Bad command line, or a \fB\-dst\fR another cachefs serves; nothing was mounted.
Service managers should not restart on it (systemd: \fBRestartPreventExitStatus=2\fR).
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter (e.g. \fBdebug\fR, \fBcachefs=debug\fR); overrides \fB\-d\fR.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR units: cachefs sends \fBREADY=1\fR once the
mount answers and \fBSTOPPING=1\fR at shutdown.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd: when it names cachefs's stderr, log lines carry \fB<N>\fR priority
prefixes and no timestamps.
.TP
\fBCACHEFS_SYSLOG_PREFIX\fR
\fB1\fR forces those prefixes (for \fBlogger \-\-prio\-prefix\fR), \fB0\fR forbids them.
.SH FILES
.TP
\fIDST\fB/.cachefs\-state/\fR
cachefs's state in the cache directory: the lock (one daemon per dst), the
writeback journal, src's last known state, the cache budget, the control socket
\fBcontrol.sock\fR.
.TP
\fB/sbin/mount.fuse.cachefs\fR
The helper for \fBmount \-t fuse.cachefs\fR \fISRC MOUNTPOINT\fR \fB\-o dst=\fR\fIDST\fR[,\fBw\fR,...]
and fstab lines.
.SH EXAMPLES
.nf
cachefs \-src /mnt/uploads\-gcs \-dst /var/cache/uploads \e
    \-mountpoint /var/www/html/wp\-content/uploads \-w \-\-revalidate 60s
cachefs status /var/cache/uploads \-\-json
mount \-t fuse.cachefs /mnt/nfs/share /srv/view \-o dst=/srv/cache,w
.fi
.SH "SEE ALSO"
\fBmount\fR(8), \fBfstab\fR(5), \fBsystemd.service\fR(5), \fBrclone\fR(1);
/usr/share/doc/cachefs/ (README.md, PRODUCTION.md, SEMANTICS.md, CACHE.md, METRICS.md).
"#;
