"""A relay for the Ethernet link between two test VMs, where the host cuts it.

  link-relay.py LISTEN TARGET PIDFILE

QEMU's stream socket netdev carries each Ethernet frame as a 4-byte big-endian length and
the frame. node-a's QEMU connects to LISTEN (127.0.0.1), the relay connects to node-b's QEMU
listening at TARGET, and forwards frames both ways. SIGUSR1 toggles dropping the frames
node-a -> node-b, SIGUSR2 node-b -> node-a: a silent cut (no carrier loss, no reset; what
is sent meanwhile is lost, as on a cut cable). Logs each toggle with a count of the frames
dropped to stderr.
"""
import os, signal, socket, struct, sys, threading, time

drop = {"a2b": False, "b2a": False}
dropped = {"a2b": 0, "b2a": 0}


def toggle(way):
    drop[way] = not drop[way]
    sys.stderr.write("%s %s %s (%d frame(s) dropped so far)\n" % (
        time.strftime("%H:%M:%S"), way, "cut" if drop[way] else "healed", dropped[way]))
    sys.stderr.flush()


def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise EOFError
        buf += d
    return buf


def pump(src, dst, way):
    # The signals must reach the main thread: Python runs handlers only there, and a
    # signal the kernel gives to this thread would wait until the main thread wakes.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    try:
        while True:
            head = read_exact(src, 4)
            (n,) = struct.unpack(">I", head)
            frame = read_exact(src, n)
            if drop[way]:
                dropped[way] += 1
                continue
            dst.sendall(head + frame)
    except (OSError, EOFError):
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main(listen, target, pidfile):
    signal.signal(signal.SIGUSR1, lambda *_: toggle("a2b"))
    signal.signal(signal.SIGUSR2, lambda *_: toggle("b2a"))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(listen)))
    srv.listen(4)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    srv.settimeout(0.2)  # and wake now and then all the same
    while True:
        try:
            a, _ = srv.accept()
        except socket.timeout:
            continue
        a.settimeout(None)
        try:
            b = socket.create_connection(("127.0.0.1", int(target)))
        except OSError:
            a.close()
            continue
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(a, b, "a2b"), daemon=True).start()
        threading.Thread(target=pump, args=(b, a, "b2a"), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:])
