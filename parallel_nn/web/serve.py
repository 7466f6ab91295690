"""`python -m parallel_nn serve [DIR]`: the live page and its JSON API (api.py), over HTTP with the
standard library (http.server), one thread per request.

Safe by default: it binds 127.0.0.1 (a --host reachable from the network is announced with a
warning; what counts is the address actually bound, so `127.1` is the loopback too), and while
bound to a loopback address it answers only requests addressed to a loopback name or address or
the --host given (a web page elsewhere that points a name of its own at 127.0.0.1, DNS rebinding,
is refused). It serves the files of the package's page folder by name, and of the run directories
only what the API makes of them; a path with a `..` segment is refused before anything is looked
up. Every error it sends is JSON in the API's shape, those of the HTTP layer too (a request it
cannot read, a method no path answers). Quiet unless --verbose. Ctrl-C stops it at once: the event
streams' threads are daemons and see the server closing.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

from parallel_nn import UserError
from parallel_nn.run.progress import write
from parallel_nn.web.api import MAX_BODY, ApiError, answer, event_stream, find_run, route
from parallel_nn.web.inference import Cache
from parallel_nn.web.runinfo import list_runs

PAGE_DIR = Path(__file__).resolve().parent / "page"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CONNECTION_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)
ALLOWED_METHODS = "GET, HEAD, POST"  # what some path answers (a 405 gives the path's own Allow)


class Server(ThreadingHTTPServer):
    """The HTTP server over the runs in `root`; `closing` is set when it stops."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 stalls a page's burst of requests

    def __init__(self, root: Path, host: str, port: int, data_dir: str, page_dir: Path = PAGE_DIR,
                 verbose: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.root, self.page_dir, self.verbose = Path(root), Path(page_dir), verbose
        self.cache = Cache(data_dir)
        self.closing = threading.Event()
        super().__init__((host, port), Handler)
        self.loopback_only = loopback(self.address)  # the address bound, not how --host spelled it
        self.host_names = {*LOOPBACK, host.lower().rstrip("."), self.address.lower()}

    @property
    def address(self) -> str:
        """The address bound (`0.0.0.0` for --host '')."""
        return str(self.server_address[0])

    @property
    def everywhere(self) -> bool:
        """Whether it listens on every address of the machine (0.0.0.0 or ::)."""
        return self.address in ("0.0.0.0", "::")

    def server_bind(self) -> None:
        # HTTPServer's own asks the resolver for the host's full name, which can take seconds where
        # DNS does not answer; nothing here uses it
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def url(self) -> str:
        """A URL to open: on this machine's loopback when it listens on every address."""
        host, port = self.server_address[:2]
        if self.everywhere:
            host = "::1" if self.address == "::" else "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def stop(self) -> None:
        """From another thread than serve_forever's: end the streams, stop serving, close the socket."""
        self.closing.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, CONNECTION_ERRORS):  # the client went away: nothing to say
            return
        if self.verbose:
            super().handle_error(request, client_address)
        else:
            write(sys.stderr, f"serve: {type(error).__name__}: {error}\n")


class Handler(BaseHTTPRequestHandler):
    server_version = "parallel_nn"
    timeout = 30  # seconds a client may take to send its request, or to take what is sent to it
    server: Server

    def log_message(self, format, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self.dispatch("OPTIONS")

    def dispatch(self, method: str) -> None:
        self.close_connection = True
        try:
            self.check_host()
            segments, query = self.parse_path()
            endpoint, name = route(method, segments)
            self.serve(endpoint, name, query)
        except ApiError as e:
            self.send_json({"error": e.message}, e.status, {"Allow": e.allow} if e.allow else None)
        except CONNECTION_ERRORS:
            pass
        except Exception as e:  # a bug: one line for the client, one on the server's stderr
            write(sys.stderr, f"serve: {self.command} {self.path[:200]}: {type(e).__name__}: {e}\n")
            self.send_json({"error": f"internal error: {type(e).__name__}"}, 500)

    def parse_request(self) -> bool:
        """The standard library's, but an HTTP/0.9 request line (`GET /path`, no version, or the
        version said) is a 400 at once: served, it held the connection until the handler's timeout,
        waiting for headers, and its answers had no status line."""
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) == 2 or (len(words) == 3 and words[2] == "HTTP/0.9"):
            self.command, self.path, self.request_version = words[0], words[1], "HTTP/0.9"
            self.close_connection = True
            self.send_error(400, "a request line needs an HTTP version (HTTP/0.9 is not served)")
            return False
        return super().parse_request()

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """What the standard library's handler refuses before a do_ method runs (a request line or
        headers it cannot read, a URI or headers too long, a method no do_ method answers), as JSON in
        the API's shape instead of its HTML page."""
        self.log_error("code %d, message %s", code, message)
        reason = {414: "the request's URI is longer than this server reads",
                  501: f"{self.command} is not a method this server answers ({ALLOWED_METHODS} are)"}.get(code)
        if reason is None:  # the standard library's words: "Bad request syntax ('...')", "Too many headers: ..."
            reason = ": ".join(filter(None, (message or self.responses.get(code, ("error",))[0], explain)))
        headers = {"Connection": "close"}
        if code == 501:  # a method no path answers: say which do
            headers["Allow"] = ALLOWED_METHODS
        if self.request_version == "HTTP/0.9":  # a request line it could not read: a whole response still
            self.request_version = "HTTP/1.0"  # (HTTP/0.9's would be the body alone, no status line)
        self.send_json({"error": " ".join(str(reason).split())[:300]}, code, headers)

    def check_host(self) -> None:
        if not self.server.loopback_only:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.split(":")[0]
        name = name[:-1] if name.endswith(".") else name  # `localhost.` is localhost
        if name not in self.server.host_names and not loopback_literal(name):
            raise ApiError(403, f"this server answers only requests addressed to 127.0.0.1, localhost or [::1], not "
                                f"{host[:80]!r} (a guard against DNS rebinding): open {self.server.url}, or "
                                f"listen on another --host")

    def parse_path(self) -> tuple[list[str], dict]:
        """The path's segments, percent-decoded, and the query; ApiError 404 for a path that is not
        absolute (`*`), a `.` or `..` segment, or one that is not a plain name."""
        parts = urlsplit(self.path)
        if not parts.path.startswith("/"):
            raise ApiError(404, "no such path")
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        for k, s in enumerate(segments):
            if "/" in s or "\0" in s or s in (".", "..") or (not s and k < len(segments) - 1):
                raise ApiError(404, "no such path")
        return segments, parse_qs(parts.query)

    def serve(self, endpoint: str, name: Optional[str], query: dict) -> None:
        if endpoint in ("page", "static"):
            self.send_static("index.html" if endpoint == "page" else name)
        elif endpoint == "runs":
            self.send_json(list_runs(self.server.root))
        elif endpoint == "events":
            self.send_stream(find_run(self.server.root, name), query)
        else:
            run = find_run(self.server.root, name)
            body = self.read_body() if endpoint == "predict" else None
            self.send_json(answer(self.server, endpoint, run, query, body))

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(400, "send the body with a Content-Length, not chunked")
        text = (self.headers.get("Content-Length") or "").strip()
        if not (text.isascii() and text.isdigit()):  # digits only: not "1_0", "+5" or "-1"
            raise ApiError(400, "a JSON body with a Content-Length (digits only) is required")
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(MAX_BODY)):  # never made a number: int() of over 4,300 digits raises
            raise ApiError(413, f"the body's Content-Length has {len(digits)} digits; at most {MAX_BODY} bytes "
                                f"are accepted")
        length = int(digits)
        if length > MAX_BODY:
            raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY} are accepted")
        return self.rfile.read(length)

    def send_static(self, name: str) -> None:
        folder = self.server.page_dir
        try:
            names = set(os.listdir(folder))
        except OSError:
            names = set()
        path = folder / name
        kind = CONTENT_TYPES.get(os.path.splitext(name)[1].lower())
        if name not in names or kind is None or not path.is_file():
            raise ApiError(404, "the page is not installed (its index.html is missing)" if name == "index.html"
                           else f"no file {name!r}")
        self.send_bytes(path.read_bytes(), kind, {"Cache-Control": "no-cache"})

    def send_json(self, obj, status: int = 200, headers: Optional[dict] = None) -> None:
        self.send_bytes(json.dumps(obj).encode(), "application/json", {"Cache-Control": "no-store", **(headers or {})},
                        status)

    def send_bytes(self, data: bytes, kind: str, headers: dict, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_stream(self, run: Path, query: dict) -> None:
        from parallel_nn.web.api import int_param

        since = int_param(query, "since", 0, 0)
        last_id = (self.headers.get("Last-Event-ID") or "").strip()
        if last_id.isascii() and last_id.isdigit() and len(last_id) <= 18:  # a browser reconnecting
            since = max(since, int(last_id) + 1)  # goes on after the last step it had
        self.send_response(200)
        for key, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                           ("X-Accel-Buffering", "no"), ("X-Content-Type-Options", "nosniff")):
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        stream = event_stream(run, since, self.server.closing, self.client_gone)
        try:
            for text in stream:
                self.wfile.write(text.encode())
        except CONNECTION_ERRORS + (OSError,):
            pass
        finally:
            stream.close()

    def client_gone(self) -> bool:
        """Whether the client closed its end (it sends nothing more on a stream, so a readable socket
        that reads as empty is a closed one)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True


def loopback(host: str) -> bool:
    """Whether `host` (an address as bound, or localhost) is reachable from this machine only
    (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def loopback_literal(name: str) -> bool:
    """Whether a Host header's name is a loopback address written out (127.0.0.1, 127.1, ::1): no
    name a DNS answer could point elsewhere."""
    if loopback(name) and name != "localhost":
        return True
    if not (name[:1].isdigit() and all(c in "0123456789abcdefx." for c in name)):
        return False
    try:  # the short IPv4 forms a browser accepts too (127.1)
        return socket.inet_aton(name)[0] == 127
    except (OSError, ValueError):
        return False


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0, data_dir: str = "datasets/mnist",
                page_dir: Path = PAGE_DIR, verbose: bool = False) -> Server:
    """The server, bound and listening but not yet serving (call serve_forever, then stop)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the runs folder (default runs/) or one run directory")
    try:
        return Server(root, host, port, data_dir, page_dir, verbose)
    except OSError as e:
        hint = "; pass another --port (0 takes a free one)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


def serve(root: str, host: str, port: int, data_dir: str, verbose: bool = False) -> int:
    """The `serve` command: listen, say where, serve until Ctrl-C (exit 130)."""
    # As the trainer does: SIGINT stops it even where it was started ignoring SIGINT (a script's
    # background job), where CPython would otherwise keep the ignore and never stop on it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = make_server(root, host, port, data_dir, verbose=verbose)
    shown = root if root.endswith("/") else root + "/"
    if not Path(root).exists():
        write(sys.stderr, f"note: {root} does not exist yet; runs will show up once training writes them there\n")
    if not server.loopback_only:
        where = f"every address ({server.address})" if server.everywhere else server.address
        write(sys.stderr, f"WARNING: listening on {where}: the page and the predict API are reachable from the "
                          f"network, with no authentication (the default, 127.0.0.1, is this machine only)\n")
    also = "; it listens on every address" if server.everywhere else ""
    write(sys.stdout, f"serving {shown} at {server.url} (Ctrl-C stops{also})\n")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        server.closing.set()
        raise
    finally:
        server.server_close()
    return 0
