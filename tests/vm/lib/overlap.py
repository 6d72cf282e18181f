"""Overlapping writers (issue #17): several writers, one per node's device, write the SAME
4 KiB blocks at once; the checker decides whether what a device or medium holds afterwards is
a value a single disk could hold.

  write DEV TAG FIRST COUNT SECONDS SEED LOG
      Writes 4 KiB O_DIRECT blocks chosen at random (seeded) among FIRST..FIRST+COUNT-1 for
      SECONDS, one at a time. Each block is stamped with its number, the writer's TAG (one
      letter) and a version counting up per block and writer. Logs "try BLK VER T" before and
      "ack BLK VER T" / "err BLK VER T MSG" after each pwrite, T = CLOCK_MONOTONIC seconds
      (all writers run on one machine, so their times compare).
  check FIRST COUNT TAG=LOG... -- IMAGE...
      Each IMAGE is blocks FIRST..FIRST+COUNT-1 read from a device or a medium after every
      writer ended. A block may hold the value of a write W only if W was tried and no write
      to that block that was acknowledged STARTED after W was acknowledged (a later write in
      real time must win); zeros only if no write to it was acknowledged. Every block must
      also read the same in every IMAGE (both devices, both media). Prints how many blocks
      both writers overwrote, exits 1 on any violation.
"""
import mmap, os, random, re, sys, time

BLOCK = 4096
STAMP = re.compile(rb"blk (\d{6}) (\w) ver (\d{8}) ")


def stamp(blk, tag, ver):
    head = b"blk %06d %s ver %08d " % (blk, tag.encode(), ver)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def write(dev, tag, first, count, seconds, seed, log):
    first, count, seconds = int(first), int(count), float(seconds)
    rng = random.Random(int(seed))
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    ver = {}
    end = time.monotonic() + seconds
    with open(log, "w", buffering=1) as out:
        while time.monotonic() < end:
            blk = first + rng.randrange(count)
            v = ver.get(blk, 0) + 1
            ver[blk] = v
            buf.seek(0)
            buf.write(stamp(blk, tag, v))
            out.write("try %d %d %.6f\n" % (blk, v, time.monotonic()))
            try:
                os.pwrite(fd, buf, blk * BLOCK)
                out.write("ack %d %d %.6f\n" % (blk, v, time.monotonic()))
            except OSError as e:
                out.write("err %d %d %.6f %s\n" % (blk, v, time.monotonic(), e.strerror))
                time.sleep(0.05)


def read_logs(specs):
    """{blk: {(tag, ver): [try_t, ack_t or None]}} from TAG=LOG arguments."""
    writes = {}
    for spec in specs:
        tag, log = spec.split("=", 1)
        for line in open(log):
            f = line.split()
            kind, blk, ver, t = f[0], int(f[1]), int(f[2]), float(f[3])
            w = writes.setdefault(blk, {}).setdefault((tag, ver), [None, None])
            if kind == "try":
                w[0] = t
            elif kind == "ack":
                w[1] = t
    return writes


def value_of(data, blk):
    if data == b"\0" * BLOCK:
        return "zeros"
    m = STAMP.match(data)
    if m and int(m.group(1)) == blk:
        tag, ver = m.group(2).decode(), int(m.group(3))
        if data == stamp(blk, tag, ver):
            return (tag, ver)
    return "garbage"


def legal(value, writes):
    acked_starts = [w[0] for w in writes.values() if w[1] is not None]
    if value == "zeros":
        return not acked_starts
    if value == "garbage" or value not in writes:
        return False
    acked_at = writes[value][1]
    return acked_at is None or all(start <= acked_at for start in acked_starts)


def check(args):
    first, count = int(args[0]), int(args[1])
    split = args.index("--")
    writes = read_logs(args[2:split])
    images = args[split + 1:]
    contents = [open(name, "rb").read() for name in images]
    bad = 0
    both = sum(1 for w in writes.values() if len({tag for tag, _ in w}) > 1)
    acks = sum(1 for w in writes.values() for x in w.values() if x[1] is not None)

    def report(msg):
        nonlocal bad
        bad += 1
        if bad <= 10:
            print(msg)

    for blk in range(first, first + count):
        values = []
        for name, img in zip(images, contents):
            data = img[(blk - first) * BLOCK:(blk - first + 1) * BLOCK]
            value = value_of(data, blk)
            values.append(value)
            w = writes.get(blk, {})
            if not legal(value, w):
                acked = [(x[1], k) for k, x in w.items() if x[1] is not None]
                report("%s: block %d holds %s, which a later acknowledged write must have "
                       "replaced (last acknowledged: %s)" % (name, blk, value, max(acked)[1] if acked else None))
        if len(set(values)) > 1:
            report("block %d differs between images: %s" % (
                blk, ", ".join("%s=%s" % (n, v) for n, v in zip(images, values))))
    print("checked %d block(s) in %d image(s) against %d acknowledged write(s); %d block(s) "
          "written by more than one writer: %d wrong" % (count, len(images), acks, both, bad))
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "write":
        write(*rest)
    elif cmd == "check":
        sys.exit(check(rest))
    else:
        sys.exit("unknown command " + cmd)
