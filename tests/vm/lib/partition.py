"""Tools of the partition suite (tests/vm/24-partition-suite.sh).

  proxy LISTEN TARGET PIDFILE
      A TCP proxy for the mirror link (node-b dials LISTEN, the proxy dials node-a at
      TARGET). SIGUSR1 toggles the direction node-a -> node-b, SIGUSR2 node-b -> node-a:
      a blocked direction holds what it reads (nothing is dropped, nothing refused, no FIN or
      RST: a silent cut). SIGSTOP of the proxy cuts both at once.
  write DEV FIRST STEP COUNT SECONDS LOG
      Writes 4 KiB O_DIRECT blocks FIRST, FIRST+STEP, ... (COUNT of them) in turn for
      SECONDS, each stamped with its block number and a version that counts up per block
      (continuing from what LOG already holds), logging "try BLK VER" before and
      "ack BLK VER" / "err BLK VER MSG" after each pwrite.
  check BASE LOG... -- IMAGE...
      Every IMAGE (a copy of the LUN's blocks from block BASE on, read through a node or
      from the medium) holds, in every block a log wrote, its last acknowledged version or a
      later version that was tried (its outcome unknown): never an older one, never garbage.
  monitor NVMCTL PERIOD LOG SPLIT CONFIG...
      The nodes' `nvmirrorctl status --json` in turn, a round every PERIOD seconds: logs
      which ranges each serves to LOG, and a range served by two nodes at once (split brain:
      one node serves it at the same epoch just before and just after the other does) to
      SPLIT.
"""
import json, mmap, os, re, signal, socket, subprocess, sys, threading, time

BLOCK = 4096


def stamp(blk, ver):
    head = b"blk %06d ver %08d " % (blk, ver)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def proxy(listen, target, pidfile):
    blocked = {"a2b": threading.Event(), "b2a": threading.Event()}
    signal.signal(signal.SIGUSR1, lambda *_: toggle(blocked["a2b"]))
    signal.signal(signal.SIGUSR2, lambda *_: toggle(blocked["b2a"]))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(listen)))
    srv.listen(16)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))

    def pump(src, dst, way):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                while blocked[way].is_set():
                    time.sleep(0.01)
                dst.sendall(d)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    while True:
        c, _ = srv.accept()
        try:
            u = socket.create_connection(("127.0.0.1", int(target)))
        except OSError:
            c.close()
            continue
        threading.Thread(target=pump, args=(c, u, "b2a"), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, "a2b"), daemon=True).start()


def toggle(ev):
    if ev.is_set():
        ev.clear()
    else:
        ev.set()


def write(dev, first, step, count, seconds, log):
    first, step, count, seconds = int(first), int(step), int(count), float(seconds)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    # Versions keep counting up across runs appending to the same log.
    ver = {}
    if os.path.exists(log):
        for line in open(log):
            f = line.split()
            if len(f) >= 3:
                ver[int(f[1])] = max(ver.get(int(f[1]), 0), int(f[2]))
    out = open(log, "a", buffering=1)
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        blk = first + (i % count) * step
        v = ver.get(blk, 0) + 1
        ver[blk] = v
        buf.seek(0)
        buf.write(stamp(blk, v))
        out.write("try %d %d\n" % (blk, v))
        try:
            os.pwrite(fd, buf, blk * BLOCK)
            out.write("ack %d %d\n" % (blk, v))
        except OSError as e:
            out.write("err %d %d %s\n" % (blk, v, e.strerror))
            time.sleep(0.05)
        i += 1
        time.sleep(0.003)


def check(args):
    base = int(args[0])
    args = args[1:]
    split = args.index("--")
    logs, images = args[:split], args[split + 1:]
    acked, tried = {}, {}
    for log in logs:
        for line in open(log):
            kind, blk, ver = line.split()[:3]
            blk, ver = int(blk), int(ver)
            if kind == "ack":
                acked[blk] = max(acked.get(blk, 0), ver)
            tried.setdefault(blk, set()).add(ver)
    bad = 0
    for name in images:
        img = open(name, "rb").read()
        for blk in sorted(tried):
            data = img[(blk - base) * BLOCK:(blk - base + 1) * BLOCK]
            m = re.match(rb"blk (\d{6}) ver (\d{8}) ", data)
            ver = int(m.group(2)) if m and int(m.group(1)) == blk and data == stamp(blk, int(m.group(2))) else None
            if data == b"\0" * BLOCK:
                ver = 0
            last = acked.get(blk, 0)
            ok = ver is not None and (ver == last or (ver > last and ver in tried[blk]))
            if not ok:
                bad += 1
                if bad <= 10:
                    print("%s: block %d holds %s; last acknowledged version %d" % (name, blk, ver, last))
    print("checked %d block(s) in %d image(s) against %d acknowledged write(s): %d wrong"
          % (len(tried), len(images), sum(1 for log in logs for l in open(log) if l.startswith("ack")), bad))
    return 1 if bad else 0


def served_by(e):
    """{(lun, range): epoch} of the ranges one node's status document says it serves."""
    return {(r["lun"], r["range"]): r["epoch"] for r in e.get("ranges", []) if r.get("serving")}


def monitor(nvmctl, period, log, split, *configs):
    """Polls the nodes' statuses in turn (a, b, a, b, ...), forever, in one process (a Python
    start per sample costs a second in the emulated VM). Each sample goes to LOG.

    Two samples are never taken at the same instant (one takes 0.1-0.3 s under emulation), so
    a giveback between them would look like two owners. A range is reported to SPLIT only
    when a node served it, at the same epoch, in the samples just before and just after one
    in which the other node served it: the first node served it throughout (a move away and
    back would change the epoch), so both served it at the middle sample's time."""
    period = float(period)
    samples = []  # (node index, {(lun, range): epoch}) of the last three samples
    turn = 0
    with open(log, "a") as out:
        while True:
            cfg = configs[turn % len(configs)]
            node = turn % len(configs)
            turn += 1
            try:
                doc = subprocess.run([nvmctl, "--config", cfg, "status", "--json"],
                                     capture_output=True, timeout=10).stdout
                served = served_by(json.loads(doc)["engine"])
            except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
                served = {}  # a node that is down or frozen serves nothing we can see
            samples = (samples + [(node, served)])[-3:]
            stamp_ = time.strftime("%H:%M:%S")
            line = "%s node %d serves %s" % (stamp_, node, " ".join(
                "%d:%d@%d" % (k[0], k[1], v) for k, v in sorted(served.items())) or "nothing")
            out.write(line + "\n")
            out.flush()
            if len(samples) == 3 and samples[0][0] == samples[2][0] != samples[1][0]:
                (x, before), (y, middle), (_, after) = samples
                both = [k for k in middle
                        if k in before and k in after and before[k] == after[k]]
                if both:
                    with open(split, "a") as f:
                        f.write("%s range(s) %s served by node %d (epoch %s, before and after) "
                                "and by node %d in between\n" % (
                                    stamp_, " ".join("%d:%d" % k for k in both), x,
                                    ",".join(str(before[k]) for k in both), y))
            if node == len(configs) - 1:
                time.sleep(period)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "proxy":
        proxy(*rest)
    elif cmd == "write":
        write(*rest)
    elif cmd == "check":
        sys.exit(check(rest))
    elif cmd == "monitor":
        monitor(*rest)
    else:
        sys.exit("unknown command " + cmd)
