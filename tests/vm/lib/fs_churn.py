#!/usr/bin/env python3
"""A metadata-heavy filesystem load that records what fsync made durable, and its checker.

    fs_churn.py run DIR JOURNAL [--seed N]   churn in DIR until killed or an I/O error
    fs_churn.py check DIR JOURNAL            after a crash: everything durable is there

`run` creates, overwrites, truncates, renames and unlinks many small files and makes
directories, each operation followed by the fsyncs an application relies on (the file, then
the directory entries it changed), plus files it never fsyncs (noise). JOURNAL lives outside
DIR (on a disk that survives the crash): before an operation it appends `U path...` (these
paths are uncertain: the operation may or may not reach the disk), and once its fsyncs have
returned `P path sha256` (the file exists with exactly this content), `A path` (it does not
exist) or `D path` (a directory exists). Each line is one write(2), so a kill leaves at most
one partial last line, which `check` ignores (its paths are still uncertain).

`check` replays JOURNAL and requires every path whose last word was P, A or D to be exactly
that in DIR: a file acknowledged by fsync with the wrong content, a file missing or one that
an fsync'ed unlink or rename should have removed is a failure (exit 1). Paths still
uncertain at the end are not checked. It prints what it checked on one line.
"""
import argparse
import hashlib
import os
import random
import sys

SIZES = [0, 1, 100, 511, 4096, 4097, 13 * 1024, 64 * 1024, 200 * 1024]
SIZE_WEIGHTS = [2, 4, 10, 6, 10, 6, 8, 4, 1]


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Journal:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(self, *words):
        os.write(self.fd, (" ".join(words) + "\n").encode())


def fsync_path(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Churn:
    def __init__(self, root, journal, seed):
        self.root = root
        self.j = journal
        self.rnd = random.Random(seed)
        self.files = {}  # relative path -> sha256 of its durable content
        self.dirs = ["."]
        self.serial = 0
        self.ops = 0

    def abs(self, rel):
        return os.path.join(self.root, rel)

    def new_name(self, prefix):
        self.serial += 1
        d = self.rnd.choice(self.dirs)
        return os.path.normpath(os.path.join(d, f"{prefix}{self.serial}"))

    def parent(self, rel):
        return self.abs(os.path.dirname(rel) or ".")

    def payload(self):
        size = self.rnd.choices(SIZES, SIZE_WEIGHTS)[0]
        return self.rnd.randbytes(size)

    def create(self):
        rel = self.new_name("f")
        data = self.payload()
        self.j.line("U", rel)
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(self.parent(rel))
        self.files[rel] = sha(data)
        self.j.line("P", rel, self.files[rel])

    def overwrite(self):
        rel = self.rnd.choice(sorted(self.files))
        path = self.abs(rel)
        data = self.payload()[: self.rnd.randint(1, 16 * 1024)] or b"x"
        self.j.line("U", rel)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, data, self.rnd.randint(0, size))  # may extend the file
            if self.rnd.random() < 0.3:
                os.ftruncate(fd, self.rnd.randint(0, os.fstat(fd).st_size))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
            content = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        self.files[rel] = sha(content)
        self.j.line("P", rel, self.files[rel])

    def rename(self):
        old = self.rnd.choice(sorted(self.files))
        new = self.new_name("r")
        self.j.line("U", old, new)
        os.rename(self.abs(old), self.abs(new))
        fsync_path(self.parent(new))
        fsync_path(self.parent(old))
        self.files[new] = self.files.pop(old)
        self.j.line("A", old)
        self.j.line("P", new, self.files[new])

    def unlink(self):
        rel = self.rnd.choice(sorted(self.files))
        self.j.line("U", rel)
        os.unlink(self.abs(rel))
        fsync_path(self.parent(rel))
        del self.files[rel]
        self.j.line("A", rel)

    def mkdir(self):
        rel = self.new_name("d")
        self.j.line("U", rel)
        os.mkdir(self.abs(rel))
        fsync_path(self.abs(rel))
        fsync_path(self.parent(rel))
        self.dirs.append(rel)
        self.j.line("D", rel)

    def noise(self):
        # Never fsync'ed: may or may not survive; only the checker of the filesystem cares.
        rel = self.new_name("n")
        with open(self.abs(rel), "wb") as f:
            f.write(self.payload())
        if self.rnd.random() < 0.5:
            os.rename(self.abs(rel), self.abs(rel) + "x")

    def step(self):
        ops = [(self.create, 40), (self.noise, 10), (self.mkdir, 3)]
        if self.files:
            ops += [(self.overwrite, 14), (self.rename, 15), (self.unlink, 15)]
        op = self.rnd.choices([o for o, _ in ops], [w for _, w in ops])[0]
        op()
        self.ops += 1


def run(args):
    journal = Journal(args.journal)
    churn = Churn(args.dir, journal, args.seed)
    try:
        while True:
            churn.step()
    except OSError as e:
        # The node under the filesystem died: expected, the crash is the point.
        print(f"fs_churn: {args.dir}: stopped after {churn.ops} operations: {e}", file=sys.stderr)
        return 0


def check(args):
    expect = {}  # path -> sha256 | "absent" | "dir"
    uncertain = set()
    with open(args.journal, "rb") as f:
        lines = f.read().split(b"\n")
    for raw in lines[:-1]:  # the last element is empty or a partial line
        words = raw.decode().split()
        if not words:
            continue
        kind, paths = words[0], words[1:]
        if kind == "U":
            uncertain.update(paths)
            continue
        path = paths[0]
        uncertain.discard(path)
        if kind == "P" and len(paths) == 2:
            expect[path] = paths[1]
        elif kind in ("A", "D"):
            expect[path] = "absent" if kind == "A" else "dir"
        else:
            raise SystemExit(f"{args.journal}: not a journal line: {raw!r}")
    bad = []
    counts = {"files": 0, "absent": 0, "dirs": 0}
    for path, want in sorted(expect.items()):
        if path in uncertain:
            continue
        full = os.path.join(args.dir, path)
        if want == "absent":
            counts["absent"] += 1
            if os.path.lexists(full):
                bad.append(f"{path}: exists, but its fsync'ed unlink or rename removed it")
        elif want == "dir":
            counts["dirs"] += 1
            if not os.path.isdir(full):
                bad.append(f"{path}: the fsync'ed directory is missing")
        else:
            counts["files"] += 1
            try:
                with open(full, "rb") as f:
                    got = sha(f.read())
            except OSError as e:
                bad.append(f"{path}: fsync'ed, but cannot be read: {e}")
                continue
            if got != want:
                bad.append(f"{path}: content differs from what fsync acknowledged")
    print(
        f"{args.dir}: {counts['files']} fsync'ed files match, {counts['absent']} removed names "
        f"absent, {counts['dirs']} directories present, {len(uncertain)} in-flight path(s) "
        f"not checked, {len(bad)} problem(s)"
    )
    for b in bad[:20]:
        print("  " + b)
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("journal")
    r.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("journal")
    args = p.parse_args()
    sys.exit(run(args) if args.cmd == "run" else check(args))


if __name__ == "__main__":
    main()
