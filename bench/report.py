#!/usr/bin/env python3
"""Render compare.sh results (a TSV file) as one text table, optionally markdown too.

  report.py RESULTS.tsv [MARKDOWN_OUT]

Input lines: SYSTEM <TAB> METRIC <TAB> VALUE <TAB> NOTE
  SYSTEM "_meta": METRIC is a key, VALUE its value (printed above the table).
  METRIC "_na":   the whole system is n/a, NOTE says why.
  VALUE "n/a":    that cell is n/a, NOTE says why.
  SYSTEM "slow:NAME": rows of the slow-src section.
"""
import sys

SYSTEMS = ["native", "cachefs", "cachefs-nopt", "mergerfs", "unionfs", "rclone"]
# key, label, unit, higher_is_better, goal (ratio to native) or None, has_ratio
METRICS = [
    ("seqread", "cached seq read 1M", "MB/s", True, ">=0.9x", True),
    ("randread", "cached rand read 4K", "IOPS", True, ">=0.85x", True),
    ("seqwrite", "seq write+fsync", "MB/s", True, ">=0.85x", True),
    ("create", "create small files", "s", False, "<=1.5x", True),
    ("stat", "stat storm", "s", False, "<=3x", True),
    ("readsmall", "read small files", "s", False, "<=2x", True),
    ("rss", "peak RSS tree walk", "MiB", False, "", False),
]
SLOW_ROWS = ["sshfs", "cachefs", "rclone"]
SLOW_METRICS = [
    ("ttfb", "first byte", "ms", False),
    ("mbps", "uncached read", "MB/s", True),
    ("reread", "2nd read (cached)", "MB/s", True),
]


def fmt_num(v):
    """Three significant digits, no exponent."""
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3g" % v


def render(rows, header, md):
    """rows: list of lists of str; first row is header."""
    if md:
        out = ["| " + " | ".join(header) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i])
                       for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
    return "\n".join(lines)


def main():
    res, notes, meta, na = {}, [], [], {}
    with open(sys.argv[1]) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            while len(parts) < 4:
                parts.append("")
            sysname, metric, value, note = parts[:4]
            if sysname == "_meta":
                meta.append((metric, value))
            elif metric == "_na":
                na[sysname] = note
            else:
                res[(sysname, metric)] = (value, note)

    systems = [s for s in SYSTEMS if any(k[0] == s for k in res) or s in na]
    footnotes = []

    def note_ref(text):
        if text not in footnotes:
            footnotes.append(text)
        return "[%d]" % (footnotes.index(text) + 1)

    def cell(sysname, key, has_ratio, higher):
        if sysname in na:
            return "n/a" + note_ref("%s: %s" % (sysname, na[sysname]))
        v = res.get((sysname, key))
        if v is None:
            return "-"
        value, note = v
        try:
            x = float(value)
        except ValueError:
            return "n/a" + (note_ref("%s %s: %s" % (sysname, key, note)) if note else "")
        s = fmt_num(x)
        if has_ratio and sysname != "native":
            base = res.get(("native", key))
            try:
                b = float(base[0]) if base else None
            except ValueError:
                b = None
            if b:
                s += " (%.2fx)" % (x / b)
        if note:
            s += note_ref("%s %s: %s" % (sysname, key, note))
        return s

    md = len(sys.argv) > 2
    header = ["metric", "unit", "better", "goal"] + systems
    rows = []
    for key, label, unit, higher, goal, has_ratio in METRICS:
        if not any((s, key) in res for s in systems) and not na:
            continue
        rows.append([label, unit, "higher" if higher else "lower", goal] +
                    [cell(s, key, has_ratio, higher) for s in systems])

    slow_present = [r for r in SLOW_ROWS if any(k[0] == "slow:" + r for k in res)
                    or ("slow:" + r) in na]
    slow_rows = []
    for r in slow_present:
        row = ["slow:" + r]
        for key, label, unit, higher in SLOW_METRICS:
            n = "slow:" + r
            if n in na:
                row.append("n/a" + note_ref("%s: %s" % (n, na[n])))
                continue
            v = res.get((n, key))
            if v is None:
                row.append("-")
                continue
            value, note = v
            try:
                x = float(value)
                s = fmt_num(x)
                base = res.get(("slow:sshfs", key))
                if r != "sshfs" and base and key != "reread":
                    try:
                        s += " (%.2fx)" % (x / float(base[0]))
                    except (ValueError, ZeroDivisionError):
                        pass
            except ValueError:
                s = "n/a"
            if note:
                s += note_ref("%s %s: %s" % (n, key, note))
            row.append(s)
        slow_rows.append(row)
    slow_header = ["slow src"] + ["%s (%s, %s)" % (lab, u, "higher" if h else "lower")
                                  for _, lab, u, h in SLOW_METRICS]

    out = []
    for k, v in meta:
        out.append("%s: %s" % (k, v))
    if rows:
        out.append("")
        out.append("Cached I/O on the local disk; (Nx) = ratio to native in this run. "
                   "MB/s and IOPS: higher is better, ratio >= 1 beats native. "
                   "Seconds and MiB: lower is better, ratio = time/native time, <= 1 beats native.")
        out.append(render(rows, header, False))
    if slow_rows:
        out.append("")
        out.append("Slow src (sshfs over a delayed loopback link); (Nx) = ratio to reading sshfs directly.")
        out.append(render(slow_rows, slow_header, False))
    if footnotes:
        out.append("")
        for i, t in enumerate(footnotes):
            out.append("[%d] %s" % (i + 1, t))
    print("\n".join(out))

    if md:
        m = ["# cachefs benchmark", ""]
        for k, v in meta:
            m.append("- %s: %s" % (k, v))
        if rows:
            m += ["", "Ratios in parentheses are to native (same run). MB/s, IOPS: higher is better. "
                  "s, MiB: lower is better (ratio = time/native time).", "",
                  render(rows, header, True)]
        if slow_rows:
            m += ["", "## Slow src", "", "Ratios to reading the sshfs src directly.", "",
                  render(slow_rows, slow_header, True)]
        if footnotes:
            m.append("")
            m += ["%d. %s" % (i + 1, t) for i, t in enumerate(footnotes)]
        with open(sys.argv[2], "w") as f:
            f.write("\n".join(m) + "\n")


if __name__ == "__main__":
    main()
