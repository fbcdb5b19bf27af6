#!/usr/bin/env python3
"""Seeded fault-injecting HTTP/1.1 proxy for S3 integration tests.

Put it in front of an S3 server (moto) and point the client's endpoint at
it.  Every request is forwarded unchanged (method, path with query, headers
including Host and the AWS signature headers, body) to --upstream, and the
upstream's status, headers and body are relayed back -- except that, with
probability --fault-share, one fault is injected into the request.

The decision is seeded: one random.Random(seed).random() draw per request,
taken under a lock in arrival order (when the request's headers have been
parsed).  A draw r < share means "fault", and the kind is
kinds[int(r / share * len(kinds))].  So for a given seed the n-th request
always gets the same decision; which request is the n-th one depends on the
client's (possibly concurrent) ordering.

Standard library only.
"""

import argparse
import http.client
import http.server
import json
import os
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import urllib.parse

FAULT_KINDS = ("503", "reset", "stall", "truncate")

DENIED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code>"
    b"<Message>Access Denied</Message></Error>"
)

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)

# Headers that describe one hop, not the message; never forwarded as is.
# (Transfer-Encoding is handled explicitly: request bodies are relayed
# verbatim with it, response bodies are re-framed with Content-Length.)
HOP_REQUEST = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
               "te", "upgrade", "expect"}
HOP_RESPONSE = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                "upgrade", "trailer"}

HELP_EPILOG = """\
fault kinds (--kinds, comma separated; a faulty request gets exactly one):
  503       not forwarded; the request body is read and discarded, then the
            proxy answers "503 Slow Down" with an S3-style XML body
            (<Error><Code>SlowDown</Code>...) and a Content-Length; the
            client connection stays usable (keep-alive).
  reset     the request (body included) is read but not forwarded, then the
            client socket is closed with a TCP RST (SO_LINGER on, timeout 0):
            the client sees "connection reset" and no response at all.
  stall     sleep --stall-s seconds, then forward and relay normally (use it
            to exercise client timeouts; a client that gives up meanwhile
            just closes its connection).
  truncate  forward the request, relay the upstream's status line and headers
            (full Content-Length) but only the first half of the body, then
            RST the connection.  Responses without a body of at least 2 bytes
            (HEAD, 204, small/empty bodies) get a plain RST instead, as with
            "reset" -- but the request did reach the upstream.
  Note: "503" and "reset" never reach the upstream; "stall" and "truncate"
  always do.  For a client, a reset or a truncated response is ambiguous:
  the request may or may not have been executed.

denied writes (--deny-writes-to SUBSTR, with --deny-after K): a PUT or POST
  whose path contains SUBSTR, after the first K such writes, is not
  forwarded; the proxy answers "403 Forbidden" with an S3 AccessDenied XML
  body (a permanent refusal: a bucket policy changed mid-run, say).  Applies
  whatever --fault-share says; logged with "fault": "deny".

log: one JSON line per request to --log (default: stderr):
  {"n": 1, "method": "PUT", "path": "/bucket/key", "fault": null|"503"|...,
   "status": <upstream status, or null when not forwarded/failed>}
  plus an "error" field when the proxy hit an exception for that request.
  On SIGTERM/SIGINT the proxy exits 0 and prints one summary line to stderr:
  "fault_proxy summary: requests=N faults=F 503=a reset=b stall=c truncate=d errors=e"
"""


class FaultPlan:
    """Seeded per-request decisions, numbered in arrival order."""

    def __init__(self, seed, share, kinds):
        self.rng = random.Random(seed)
        self.share = share
        self.kinds = list(kinds)
        self.lock = threading.Lock()
        self.n = 0
        self.counts = {k: 0 for k in FAULT_KINDS}
        self.errors = 0
        self.deny_to = None
        self.deny_after = 0
        self.deny_seen = 0

    def decide_from(self, r):
        if self.share > 0 and r < self.share and self.kinds:
            idx = min(int(r / self.share * len(self.kinds)), len(self.kinds) - 1)
            return self.kinds[idx]
        return None

    def next(self):
        with self.lock:
            self.n += 1
            fault = self.decide_from(self.rng.random())
            if fault:
                self.counts[fault] += 1
            return self.n, fault

    def deny(self, method, path):
        """Whether this write is refused (--deny-writes-to / --deny-after)."""
        if not self.deny_to or method not in ("PUT", "POST") or self.deny_to not in path:
            return False
        with self.lock:
            self.deny_seen += 1
            return self.deny_seen > self.deny_after

    def note_error(self):
        with self.lock:
            self.errors += 1

    def summary(self):
        with self.lock:
            faults = sum(self.counts.values())
            parts = [f"requests={self.n}", f"faults={faults}"]
            parts += [f"{k}={self.counts[k]}" for k in FAULT_KINDS]
            parts.append(f"errors={self.errors}")
            return "fault_proxy summary: " + " ".join(parts)


class JsonLog:
    def __init__(self, path):
        self.lock = threading.Lock()
        if path:
            self.f = open(path, "a", encoding="utf-8", buffering=1)
        else:
            self.f = sys.stderr

    def write(self, record):
        line = json.dumps(record, separators=(",", ":"))
        with self.lock:
            try:
                self.f.write(line + "\n")
                self.f.flush()
            except (OSError, ValueError):
                pass


class ClientGone(Exception):
    """The client closed or broke its connection."""


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault_proxy"
    timeout = 600  # idle keep-alive connections are dropped after this

    # set on the class by main()
    plan = None
    log = None
    upstream = None  # (host, port)
    stall_s = 2.0
    upstream_timeout = 600.0

    # -- plumbing ---------------------------------------------------------

    def log_message(self, format, *args):  # silence http.server's access log
        pass

    def setup(self):
        super().setup()
        self._up = None

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        if self._up is not None:
            self._up.close()
            self._up = None

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, ClientGone, socket.timeout, OSError):
            self.close_connection = True
        except Exception:  # never let one request kill anything else
            self.plan.note_error()
            self.log.write({"error": traceback.format_exc(limit=3)})
            self.close_connection = True

    def _read_exact(self, n):
        chunks = []
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b:
                raise ClientGone("client closed mid-body")
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def _read_body(self):
        """Read the request body; return the raw bytes as they must be
        forwarded (chunked bodies are relayed verbatim, chunk framing and
        trailers included)."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            raw = []
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise ClientGone("client closed in chunk header")
                raw.append(line)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        t = self.rfile.readline(65537)
                        if not t.endswith(b"\n"):
                            raise ClientGone("client closed in trailers")
                        raw.append(t)
                        if t in (b"\r\n", b"\n"):
                            break
                    break
                raw.append(self._read_exact(size + 2))
            return b"".join(raw)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        return self._read_exact(int(cl.strip()))

    def _rst(self):
        """Close the client socket with a TCP RST."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.wfile.flush()
        except OSError:
            pass
        # rfile is a makefile() of the socket: it must be closed as well,
        # otherwise sock.close() would not release the descriptor.
        try:
            self.rfile.close()
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _send_raw(self, status, reason, headers, body):
        out = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
        for k, v in headers:
            out.append(f"{k}: {v}\r\n".encode("latin-1"))
        out.append(b"\r\n")
        try:
            self.wfile.write(b"".join(out))
            if body:
                self.wfile.write(body)
            self.wfile.flush()
        except OSError as e:
            raise ClientGone(str(e))

    def _forward(self, body):
        """Send the request upstream; return (status, reason, headers, body)."""
        for attempt in (0, 1):
            fresh = self._up is None
            if fresh:
                self._up = http.client.HTTPConnection(
                    self.upstream[0], self.upstream[1], timeout=self.upstream_timeout)
            conn = self._up
            try:
                conn.putrequest(self.command, self.path,
                                skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() in HOP_REQUEST:
                        continue
                    conn.putheader(k, v)
                conn.endheaders()
                if body:
                    conn.send(body)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                    self._up = None
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as e:
                conn.close()
                self._up = None
                # A reused keep-alive connection may have been closed by the
                # upstream meanwhile: retry once on a fresh one.
                if fresh or attempt == 1:
                    raise
            except Exception:
                conn.close()
                self._up = None
                raise
        raise AssertionError("unreachable")

    def _relay_headers(self, status, headers, body):
        out = []
        had_length = False
        for k, v in headers:
            kl = k.lower()
            if kl in HOP_RESPONSE:
                continue
            if kl == "content-length":
                had_length = True
            out.append((k, v))
        no_body = (self.command == "HEAD" or status in (204, 304) or 100 <= status < 200)
        if not had_length and not no_body:
            out.append(("Content-Length", str(len(body))))
        if self.close_connection:
            out.append(("Connection", "close"))
        return out, no_body

    # -- the request ------------------------------------------------------

    def _proxy(self):
        n, fault = self.plan.next()
        rec = {"n": n, "method": self.command, "path": self.path,
               "fault": fault, "status": None}
        try:
            try:
                body = self._read_body()
            except ValueError as e:  # malformed Content-Length / chunk size
                rec["error"] = f"bad request body: {e}"
                msg = b"fault_proxy: malformed request body framing\n"
                self.close_connection = True
                self._send_raw(400, "Bad Request",
                               [("Content-Type", "text/plain"),
                                ("Content-Length", str(len(msg))),
                                ("Connection", "close")], msg)
                return
            if self.plan.deny(self.command, self.path):
                rec["fault"] = "deny"
                hdrs = [("Content-Type", "application/xml"),
                        ("Content-Length", str(len(DENIED_BODY))),
                        ("x-amz-request-id", f"FAULTPROXY{n:08d}")]
                if self.close_connection:
                    hdrs.append(("Connection", "close"))
                self._send_raw(403, "Forbidden", hdrs, DENIED_BODY)
                return
            if fault == "503":
                hdrs = [("Content-Type", "application/xml"),
                        ("Content-Length", str(len(SLOWDOWN_BODY))),
                        ("x-amz-request-id", f"FAULTPROXY{n:08d}")]
                if self.close_connection:
                    hdrs.append(("Connection", "close"))
                self._send_raw(503, "Slow Down", hdrs,
                               b"" if self.command == "HEAD" else SLOWDOWN_BODY)
                return
            if fault == "reset":
                self._rst()
                return
            if fault == "stall":
                time.sleep(self.stall_s)
            try:
                status, reason, headers, data = self._forward(body)
            except Exception as e:
                rec["error"] = f"upstream: {type(e).__name__}: {e}"
                self.plan.note_error()
                msg = f"fault_proxy: upstream error: {type(e).__name__}: {e}\n".encode()
                self.close_connection = True
                self._send_raw(502, "Bad Gateway",
                               [("Content-Type", "text/plain"),
                                ("Content-Length", str(len(msg))),
                                ("Connection", "close")],
                               b"" if self.command == "HEAD" else msg)
                return
            rec["status"] = status
            out, no_body = self._relay_headers(status, headers, data)
            if fault == "truncate":
                if no_body or len(data) < 2:
                    self._rst()
                    return
                self._send_raw(status, reason, out, data[: len(data) // 2])
                self._rst()
                return
            self._send_raw(status, reason, out, b"" if no_body else data)
        except ClientGone as e:
            self.close_connection = True
            rec.setdefault("error", f"client: {e}")
        except (ConnectionError, socket.timeout, OSError) as e:
            self.close_connection = True
            rec.setdefault("error", f"client: {type(e).__name__}: {e}")
        except Exception as e:
            self.close_connection = True
            self.plan.note_error()
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            self.log.write(rec)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy
    do_OPTIONS = do_PATCH = _proxy


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # Errors are logged per request; don't spray tracebacks.
        pass


def parse_kinds(s):
    kinds = [k.strip() for k in s.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind(s) {bad}; choose among {','.join(FAULT_KINDS)}")
    return kinds


def parse_share(s):
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("--fault-share must be within [0, 1]")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Forwards every request "
        "to --upstream and injects seeded faults into a share of them.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True,
                   help="base URL of the real server, e.g. http://127.0.0.1:5000 "
                        "(plain http only; its path part is ignored)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fault decisions (default 0)")
    p.add_argument("--fault-share", type=parse_share, default=0.0,
                   help="probability in [0,1] that a request gets a fault "
                        "(default 0: pure pass-through)")
    p.add_argument("--kinds", type=parse_kinds, default=list(FAULT_KINDS),
                   help="comma-separated fault kinds to choose from, uniformly "
                        f"(default {','.join(FAULT_KINDS)}); see below")
    p.add_argument("--stall-s", type=float, default=2.0,
                   help="seconds a 'stall' fault waits before forwarding (default 2.0)")
    p.add_argument("--port", type=int, default=0,
                   help="port to listen on, on 127.0.0.1 (default 0: any free port)")
    p.add_argument("--port-file", default=None,
                   help="write the listening port (decimal, newline) to this file, "
                        "atomically (temp file + rename)")
    p.add_argument("--log", default=None,
                   help="append one JSON line per request to this file "
                        "(default: stderr)")
    p.add_argument("--deny-writes-to", default=None, metavar="SUBSTR",
                   help="refuse PUT/POST requests whose path contains SUBSTR with 403 "
                        "AccessDenied (after --deny-after of them passed)")
    p.add_argument("--deny-after", type=int, default=0, metavar="K",
                   help="matching writes that pass before the refusals begin (default 0)")
    p.add_argument("--print-plan", type=int, default=0, metavar="N",
                   help="print the fault decisions for requests 1..N as JSON lines "
                        "and exit (no server)")
    args = p.parse_args(argv)

    up = urllib.parse.urlsplit(args.upstream)
    if up.scheme != "http" or not up.hostname:
        p.error("--upstream must be an http://host[:port] URL")
    upstream = (up.hostname, up.port or 80)

    plan = FaultPlan(args.seed, args.fault_share, args.kinds)
    plan.deny_to = args.deny_writes_to
    plan.deny_after = args.deny_after
    if args.print_plan:
        for _ in range(args.print_plan):
            n, fault = plan.next()
            print(json.dumps({"n": n, "fault": fault}))
        return 0

    ProxyHandler.plan = plan
    ProxyHandler.log = JsonLog(args.log)
    ProxyHandler.upstream = upstream
    ProxyHandler.stall_s = args.stall_s

    server = Server(("127.0.0.1", args.port), ProxyHandler)
    port = server.server_address[1]

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="serve", daemon=True)
    t.start()

    if args.port_file:
        d = os.path.dirname(os.path.abspath(args.port_file))
        tmp = os.path.join(d, f".{os.path.basename(args.port_file)}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"listening on 127.0.0.1:{port}", flush=True)

    while not stop.wait(0.5):
        if not t.is_alive():
            break
    server.shutdown()
    server.server_close()
    print(plan.summary(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
