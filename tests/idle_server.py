# A worker that greets each connection with its pid ("pid=N\n") and then
# holds it, idle, until the client closes it: one thread, a selector, for
# thousands of connections. It listens on 127.0.0.1:$PORT (ipcluster sets
# PORT). Included (include_str!) by the root test master_connections and by
# the bench case master-scale (xtask/src/bench/master_scale.rs).
import os, selectors, socket
port = int(os.environ["PORT"])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(4096)
s.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
greeting = ("pid=%d\n" % os.getpid()).encode()
while True:
    for key, _ in sel.select():
        if key.fileobj is s:
            for _ in range(256):
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                try:
                    c.send(greeting)
                except OSError:
                    pass
                sel.register(c, selectors.EVENT_READ)
        else:
            c = key.fileobj
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
