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
      Every PERIOD seconds, each node's `nvmirrorctl status --json`: logs which node serves
      which range to LOG, and a range served by two nodes at once (split brain) to SPLIT.
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


def served_by(statuses):
    """{(lun, range): [nodes serving it]} from the nodes' status documents."""
    served = {}
    for e in statuses:
        for r in e.get("ranges", []):
            if r.get("serving"):
                served.setdefault((r["lun"], r["range"]), []).append(e["node"])
    return served


def monitor(nvmctl, period, log, split, *configs):
    """Polls every node's status back to back, forever, in one process (a Python start per
    sample costs a second in the emulated VM). Each sample goes to LOG; a range served by two
    nodes at once goes to SPLIT too."""
    period = float(period)
    with open(log, "a") as out:
        while True:
            statuses = []
            for cfg in configs:
                try:
                    doc = subprocess.run([nvmctl, "--config", cfg, "status", "--json"],
                                         capture_output=True, timeout=10).stdout
                    statuses.append(json.loads(doc)["engine"])
                except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
                    pass  # a node that is down or frozen serves nothing we can see
            served = served_by(statuses)
            line = " ".join("%d:%d=%s" % (k[0], k[1], "+".join(v)) for k, v in sorted(served.items()))
            stamp_ = time.strftime("%H:%M:%S")
            out.write("%s %s\n" % (stamp_, line))
            out.flush()
            if any(len(v) > 1 for v in served.values()):
                with open(split, "a") as f:
                    f.write("%s %s\n" % (stamp_, line))
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
