#!/usr/bin/env python3
"""A minimal ipcluster-aware HTTP worker, standard library only.

Run it under ipcluster:  ipcluster run -- python3 ipcluster/examples/python_worker.py

It listens on $PORT, connects to the control socket $IPCLUSTER_CONTROL,
says hello, pings every 500 ms with a statistic, and on `die` stops
accepting and exits. An unmodified server would work too; talking to the
master adds health checks (busy, hung) and a clean exit.
"""

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PING_INTERVAL = 0.5
MAX_LINE = 256 * 1024  # the protocol's line limit (docs/protocol.md)

BAND = int(os.environ.get("IPCLUSTER_BAND", "0"))
GENERATION = int(os.environ.get("IPCLUSTER_GENERATION", "0"))
served = 0  # the statistic sent with every ping


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        served += 1
        host, port = self.client_address[:2]
        if host.startswith("::ffff:"):  # an IPv4 client on the dual-stack socket
            host = host[len("::ffff:"):]
        body = json.dumps({
            "band": BAND,
            "pid": os.getpid(),
            "generation": GENERATION,
            "client": "%s:%s" % (host, port),
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class DualStackServer(ThreadingHTTPServer):
    """Listens on IPv6 and IPv4 (falls back to IPv4 only)."""
    address_family = socket.AF_INET6
    daemon_threads = True


def send(sock, message):
    sock.sendall(json.dumps(message).encode() + b"\n")


def control(path, port, on_die):
    """Talk to the master; reconnect (and say hello again) if it goes away."""
    backoff = 0.05
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            send(sock, {"type": "hello", "band": BAND, "generation": GENERATION, "ports": [port]})
            backoff = 0.05
            pending = b""
            next_ping = time.monotonic() + PING_INTERVAL
            while True:
                now = time.monotonic()
                if now >= next_ping:
                    send(sock, {"type": "ping", "busy": False, "stats": {"served": served}})
                    next_ping = now + PING_INTERVAL
                sock.settimeout(max(next_ping - now, 0.001))
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                if not data:
                    break  # the master went away (a reload): reconnect
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    kind = message.get("type")
                    if kind == "retire":
                        print("worker %d retired: %s" % (os.getpid(), message.get("reason")), file=sys.stderr)
                    elif kind == "die":
                        print("worker %d asked to die: %s" % (os.getpid(), message.get("reason")), file=sys.stderr)
                        on_die()
                        return
                    elif kind == "info":
                        print("worker %d: %s" % (os.getpid(), message), file=sys.stderr)
                if len(pending) > MAX_LINE:
                    pending = b""
        except OSError as e:
            print("worker %d: control socket: %s" % (os.getpid(), e), file=sys.stderr)
        time.sleep(backoff)
        backoff = min(backoff * 2, 1.0)


def main():
    port = int(os.environ["PORT"])
    try:
        server = DualStackServer(("::", port), Handler)
    except OSError:
        DualStackServer.address_family = socket.AF_INET
        server = DualStackServer(("0.0.0.0", port), Handler)
    path = os.environ.get("IPCLUSTER_CONTROL")
    if path:
        # shutdown() stops serve_forever() below: no new connections, then exit.
        threading.Thread(target=control, args=(path, port, server.shutdown), daemon=True).start()
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
