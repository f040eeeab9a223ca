"""A loopback kube-apiserver stand-in speaking list/watch the way the real `kubernetes` client uses it.

No kube-apiserver can be installed here (HARNESS.md), so the k8sattributes tests run the real `kubernetes` client
against this: JSON objects with a global resourceVersion, field selectors (`spec.nodeName`, metadata.name/namespace)
and label selectors (equality, set-based, exists), chunked newline-delimited watch streams with ADDED/MODIFIED/
DELETED (including selector transitions), BOOKMARK events, `ERROR 410 Expired` when a watch resumes from a
compacted resourceVersion, `504 Too large resource version` for a list asking for a resourceVersion the server has
not reached (a real one first waits up to 3s for its watch cache to catch up; a watch gets it as an ERROR event),
Status error bodies, and optional bearer-token auth and TLS.

Fault injection for the tests: `forbid()` (403), `fail()` (500 or any code, optionally with Retry-After),
`delay()` (slow responses), `watch_error()` (an ERROR event with any Status inside an accepted watch's stream),
`drop_watches()` (connections cut mid-stream), `outage()` (every request's connection closed unanswered),
`blank_line()` (an empty line in every open watch stream, as proxies send for keep-alive), `hold()` (a request
kept unanswered until the test releases it: forces one interleaving of client threads without sleeps).
`requests` records what the client asked (method, path, query, token) so tests can assert on it.

    api = ApiServer().start()
    api.create("namespaces", None, {"metadata": {"name": "ml"}})
    api.create("pods", "ml", pod(...))
    kubeconfig = api.write_kubeconfig(tmp_path)
"""

from __future__ import annotations

import copy
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# plural -> (groupVersion, kind, namespaced, selectable fields besides metadata.name/namespace)
RESOURCES: dict[str, tuple[str, str, bool, frozenset[str]]] = {
    "pods": ("v1", "Pod", True, frozenset({"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                                           "spec.serviceAccountName", "status.phase", "status.podIP"})),
    "namespaces": ("v1", "Namespace", False, frozenset({"status.phase"})),
    "nodes": ("v1", "Node", False, frozenset({"spec.unschedulable"})),
    "replicasets": ("apps/v1", "ReplicaSet", True, frozenset()),
    "deployments": ("apps/v1", "Deployment", True, frozenset()),
    "statefulsets": ("apps/v1", "StatefulSet", True, frozenset()),
    "daemonsets": ("apps/v1", "DaemonSet", True, frozenset()),
    "jobs": ("batch/v1", "Job", True, frozenset()),
    "cronjobs": ("batch/v1", "CronJob", True, frozenset()),
    # DRA: the podresources receiver lists this node's slices (served at another version with `served`)
    "resourceslices": ("resource.k8s.io/v1", "ResourceSlice", False, frozenset({"spec.nodeName", "spec.driver"})),
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details
        self.retry_after = retry_after  # seconds: the Retry-After header and details.retryAfterSeconds

    def status(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code}
        details = dict(self.details or {})
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
        if details:
            out["details"] = details
        return out


# ---------------------------------------------------------------------------------------------------------
# Selectors


def _field_value(obj: dict, path: str) -> str:
    cur: object = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    return str(cur).lower() if isinstance(cur, bool) else str(cur)


def field_selector(resource: str, text: str | None) -> Callable[[dict], bool]:
    allowed = {"metadata.name", "metadata.namespace"} | RESOURCES[resource][3]
    terms = []
    for term in filter(None, (text or "").split(",")):
        m = re.fullmatch(r"([^!=]+)(==|!=|=)(.*)", term)
        if not m or m.group(1) not in allowed:
            raise ApiError(400, "BadRequest", f'"{term}" is not a known field selector: only "{", ".join(sorted(allowed))}"')
        terms.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return lambda o: all((_field_value(o, k) == v) == eq for k, eq, v in terms)


def label_selector(text: str | None) -> Callable[[dict], bool]:
    preds: list[Callable[[dict], bool]] = []
    for term in filter(None, (t.strip() for t in re.split(r",(?![^(]*\))", text or ""))):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            k, op, vs = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            preds.append(lambda labels, k=k, op=op, vs=vs: (labels.get(k) in vs) == (op == "in"))
        elif m := re.fullmatch(r"([^!=]+)(==|!=|=)(.*)", term):
            k, eq, v = m.group(1).strip(), m.group(2) != "!=", m.group(3).strip()
            preds.append(lambda labels, k=k, eq=eq, v=v: (labels.get(k) == v) == eq)
        else:
            neg, k = term.startswith("!"), term.lstrip("!")
            preds.append(lambda labels, k=k, neg=neg: (k in labels) != neg)
    return lambda o: all(p(o.get("metadata", {}).get("labels") or {}) for p in preds)


def merge_patch(target: object, patch: object) -> object:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---------------------------------------------------------------------------------------------------------
# Store


class Store:
    """Objects, a global resourceVersion and an event history that `compact()` forgets."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1
        self.objs: dict[tuple[str, str | None, str], dict] = {}
        self.events: list[tuple[int, str, str, dict, dict | None]] = []  # (rv, resource, type, new, old)
        self.compacted = 0

    def _emit(self, resource: str, etype: str, new: dict, old: dict | None) -> None:
        self.events.append((self.rv, resource, etype, copy.deepcopy(new), copy.deepcopy(old)))
        self.cond.notify_all()

    def compact(self) -> None:
        with self.cond:
            self.compacted, self.events = self.rv, []

    def list(self, resource: str, ns: str | None, fsel, lsel) -> tuple[list[dict], str]:
        with self.cond:
            items = [copy.deepcopy(o) for (r, n, _), o in sorted(self.objs.items(), key=lambda kv: str(kv[0]))
                     if r == resource and ns in (None, n) and fsel(o) and lsel(o)]
            return items, str(self.rv)

    def get(self, resource: str, ns: str | None, name: str) -> dict:
        with self.cond:
            obj = self.objs.get((resource, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            return copy.deepcopy(obj)

    def create(self, resource: str, ns: str | None, body: dict) -> dict:
        gv, kind, namespaced, _ = RESOURCES[resource]
        obj = copy.deepcopy(body)
        md = obj.setdefault("metadata", {})
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        ns = (ns or md.get("namespace") or "default") if namespaced else None
        if namespaced:
            md["namespace"] = ns
        with self.cond:
            key = (resource, ns, md["name"])
            if key in self.objs:
                raise ApiError(409, "AlreadyExists", f'{resource} "{md["name"]}" already exists')
            if namespaced and ("namespaces", None, ns) not in self.objs:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
            self.rv += 1
            obj.update(apiVersion=gv, kind=kind)
            md.setdefault("uid", str(uuid.uuid4()))
            md.update(creationTimestamp=_now(), resourceVersion=str(self.rv), generation=1)
            if resource == "pods":
                obj.setdefault("status", {}).setdefault("phase", "Pending")
            self.objs[key] = obj
            self._emit(resource, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def update(self, resource: str, ns: str | None, name: str, fn: Callable[[dict], dict]) -> dict:
        with self.cond:
            old = self.get(resource, ns, name)
            new = fn(copy.deepcopy(old))
            for k in ("uid", "creationTimestamp", "name", "namespace"):
                if k in old["metadata"]:
                    new.setdefault("metadata", {})[k] = old["metadata"][k]
            self.rv += 1
            new["metadata"]["resourceVersion"] = str(self.rv)
            self.objs[(resource, ns, name)] = new
            self._emit(resource, "MODIFIED", new, old)
            return copy.deepcopy(new)

    def delete(self, resource: str, ns: str | None, name: str) -> dict:
        """Deletes at once (as with gracePeriodSeconds=0: there is no kubelet behind this server)."""
        with self.cond:
            obj = self.get(resource, ns, name)
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            del self.objs[(resource, ns, name)]
            self._emit(resource, "DELETED", obj, obj)
            return obj


# ---------------------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    """Applies to requests whose resource and verb match (None matches any); `times` None means until cleared."""

    action: str  # "status" | "delay" | "drop" | "hold" | "event"
    resource: str | None = None
    verb: str | None = None  # list | watch | get | create | update | patch | delete
    code: int = 500
    seconds: float = 0.0
    times: int | None = None
    retry_after: int | None = None  # with "status": the Retry-After header (seconds), as 429s and 503s carry
    gate: threading.Event = field(default_factory=threading.Event)  # with "hold": set by release()
    held: int = 0  # with "hold": requests it has held so far
    error: ApiError | None = None  # with "event": the Status an accepted watch's stream carries as an ERROR event
    body: str | None = None  # with "status": this body instead of a Status (a proxy's answer, a broken server's)

    def release(self) -> None:
        self.gate.set()

    def matches(self, resource: str | None, verb: str) -> bool:
        return (self.resource in (None, resource)) and (self.verb in (None, verb)) and self.times != 0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    resource: str | None
    verb: str
    token: str | None = None
    at: float = field(default_factory=time.monotonic)  # when it arrived


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: ApiServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _route(self):
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        parts = [p for p in u.path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            gv, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None, None, None, q, u.path
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in RESOURCES or self.api.served.get(rest[0], RESOURCES[rest[0]][0]) != gv:
            return None, None, None, q, u.path
        return rest[0], ns, (rest[1] if len(rest) > 1 else None), q, u.path

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}") if n else {}

    def _cut(self) -> None:
        """Close the connection with no (or half a) response, as a crashed or partitioned server does."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, method: str) -> None:
        api = self.api
        resource, ns, name, q, path = self._route()
        watching = q.get("watch") in ("true", "1")
        verb = {"GET": "watch" if watching else ("get" if name else "list"), "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete"}[method]
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        api._record(Request(method, self.path, q, resource, verb, token))
        try:
            fault = api._fault_for(resource, verb)
            if fault is not None and fault.action == "delay":
                time.sleep(fault.seconds)
                fault = None
            if fault is not None and fault.action == "hold":
                fault.held += 1
                fault.gate.wait(30)  # (bounded: a test that forgets to release does not hang the server)
                # then answered as usual, or with the hold's status code when one was given
                fault = Fault("status", code=fault.code, retry_after=fault.retry_after) if fault.code else None
            if fault is not None and fault.action == "drop":
                return self._cut()
            if fault is not None and fault.action == "event" and watching:
                # the watch is accepted (200), then its stream carries one ERROR event with the Status and ends
                return self._stream(resource, ns, None, None, q, error=fault.error)
            if fault is not None and fault.action == "status" and fault.body is not None:
                data = fault.body.encode()
                self.send_response(fault.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if fault is not None and fault.action == "status":
                if fault.code == 403:
                    raise ApiError(403, "Forbidden",
                                   f'{resource} is forbidden: User "system:serviceaccount:podmeter:podmeter" cannot '
                                   f'{verb} resource "{resource}" in API group "{RESOURCES[resource][0].rpartition("/")[0] if resource else ""}" at the cluster scope')
                if fault.code == 429:
                    raise ApiError(429, "TooManyRequests", "Too many requests, please try again later.",
                                   retry_after=fault.retry_after)
                raise ApiError(fault.code, "InternalError", "Internal error occurred: injected failure",
                               retry_after=fault.retry_after)
            if api.token is not None and token not in api.valid_tokens():
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if resource is None:
                doc = _discovery(path.rstrip("/")) if method == "GET" else None
                if doc is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send(200, doc)
            store = api.store
            gv, kind = RESOURCES[resource][:2]
            if verb in ("list", "watch"):
                fsel, lsel = field_selector(resource, q.get("fieldSelector")), label_selector(q.get("labelSelector"))
                if watching:
                    return self._stream(resource, ns, fsel, lsel, q)
                asked = q.get("resourceVersion") or "0"
                if asked != "0" and int(asked) > store.rv:
                    # (a real server waits up to 3s for its watch cache to reach it first)
                    raise ApiError(504, "Timeout", f"Too large resource version: {asked}, current: {store.rv}",
                                   {"causes": [{"reason": "ResourceVersionTooLarge",
                                                "message": "Too large resource version"}]}, retry_after=1)
                items, rv = store.list(resource, ns, fsel, lsel)
                return self._send(200, {"kind": kind + "List", "apiVersion": gv, "metadata": {"resourceVersion": rv},
                                        "items": items})
            if verb == "get":
                return self._send(200, store.get(resource, ns, name))
            if verb == "create":
                return self._send(201, store.create(resource, ns, self._body()))
            if verb == "update":
                body = self._body()
                return self._send(200, store.update(resource, ns, name, lambda old: body))
            if verb == "patch":
                body = self._body()
                return self._send(200, store.update(resource, ns, name, lambda old: merge_patch(old, body)))
            return self._send(200, store.delete(resource, ns, name))
        except ApiError as e:
            self._send(e.code, e.status(), {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None)

    def _stream(self, resource, ns, fsel, lsel, q, error: ApiError | None = None) -> None:
        api = self.api
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        me = _Watch(self.connection)
        with api._lock:
            api._watches.add(me)
        try:
            events = [{"type": "ERROR", "object": error.status()}] if error is not None else \
                api._events(resource, ns, fsel, lsel, q.get("resourceVersion"), float(q.get("timeoutSeconds", 1800)),
                            q.get("allowWatchBookmarks") in ("true", "1"), me)
            for event in events:
                data = b"\n" if event is None else json.dumps(event).encode() + b"\n"  # None: a blank line
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            if not me.cut:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except OSError:
            pass
        finally:
            with api._lock:
                api._watches.discard(me)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # a client that gave up (read timeout) or a cut connection is part of the tests, not an error
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@dataclass(eq=False)
class _Watch:
    conn: socket.socket
    cut: bool = False
    blanks: int = 0  # blank lines to send

    def kill(self) -> None:
        self.cut = True
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _discovery(path: str) -> dict | None:
    if path == "/version":
        return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-podmeter-test", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    return None


@dataclass
class ApiServer:
    """The stand-in. `token`: when set, requests must carry `Authorization: Bearer <token>` (or one of
    `extra_tokens`), as a real server checks a service account token."""

    bookmark_interval: float = 60.0
    token: str | None = None
    extra_tokens: set[str] = field(default_factory=set)
    tls_cert: str | None = None
    tls_key: str | None = None
    store: Store = field(default_factory=Store)
    requests: list[Request] = field(default_factory=list)
    # plural -> the group/version it is served at instead of RESOURCES' (an older server: resourceslices at
    # resource.k8s.io/v1beta1); None: not served at all (404, as a server without the API)
    served: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._watches: set[_Watch] = set()
        self._server: ThreadingHTTPServer | None = None
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> ApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        srv = _Server(("127.0.0.1", port), handler)
        srv.daemon_threads = True
        if self.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self._server = srv
        threading.Thread(target=srv.serve_forever, name="apiserver", daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping = True
        self.drop_watches()
        with self.store.cond:
            self.store.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> ApiServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubeconfig(self, ca_file: str | None = None) -> str:
        cluster = f"    server: {self.url}\n" + (f"    certificate-authority: {ca_file}\n" if ca_file else "")
        return ("apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n" + cluster +
                "contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
                f"users:\n- name: test\n  user:\n    token: {self.token or 'test'}\n")

    def write_kubeconfig(self, directory, ca_file: str | None = None) -> str:
        path = f"{directory}/kubeconfig.yaml"
        with open(path, "w") as f:
            f.write(self.kubeconfig(ca_file))
        return path

    def valid_tokens(self) -> set[str]:
        return {self.token, *self.extra_tokens} if self.token else set()

    # -- objects ------------------------------------------------------------------------------------------------

    def create(self, resource: str, ns: str | None, body: dict) -> dict:
        return self.store.create(resource, ns, body)

    def patch(self, resource: str, ns: str | None, name: str, patch: dict) -> dict:
        return self.store.update(resource, ns, name, lambda old: merge_patch(old, patch))

    def delete(self, resource: str, ns: str | None, name: str) -> dict:
        return self.store.delete(resource, ns, name)

    def compact(self) -> None:
        """Forget event history: a watch resuming from an older resourceVersion gets ERROR 410 Expired."""
        self.store.compact()

    # -- faults ---------------------------------------------------------------------------------------------------

    def forbid(self, resource: str | None = None, verb: str | None = None) -> Fault:
        return self._add_fault(Fault("status", resource, verb, code=403))

    def fail(self, resource: str | None = None, verb: str | None = None, code: int = 500,
             times: int | None = None, retry_after: int | None = None, body: str | None = None) -> Fault:
        """Answer matching requests with `code` and a Status, or with `body` as it is when given."""
        return self._add_fault(Fault("status", resource, verb, code=code, times=times, retry_after=retry_after,
                                     body=body))

    def delay(self, seconds: float, resource: str | None = None, verb: str | None = None,
              times: int | None = None) -> Fault:
        return self._add_fault(Fault("delay", resource, verb, seconds=seconds, times=times))

    def hold(self, resource: str | None = None, verb: str | None = None, times: int | None = 1,
             code: int = 0) -> Fault:
        """Keep matching requests unanswered until `release()`; then answer them normally, or with `code`."""
        return self._add_fault(Fault("hold", resource, verb, code=code, times=times))

    def watch_error(self, resource: str | None = None, code: int = 500, reason: str = "InternalError",
                    message: str = "Internal error occurred: injected failure", details: dict | None = None,
                    retry_after: int | None = None, times: int | None = 1) -> Fault:
        """Accept matching watches (200), then send one ERROR event with this Status (details.retryAfterSeconds
        from `retry_after`) and end the stream, as a real server reports errors found after it accepted a watch."""
        return self._add_fault(Fault("event", resource, "watch", times=times,
                                     error=ApiError(code, reason, message, details, retry_after)))

    def outage(self) -> Fault:
        """Every request's connection is closed unanswered, and running watches are cut, until `clear()`."""
        fault = self._add_fault(Fault("drop"))
        self.drop_watches()
        return fault

    def clear(self, fault: Fault | None = None) -> None:
        with self._lock:
            self._faults = [] if fault is None else [f for f in self._faults if f is not fault]

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.kill()
        with self.store.cond:
            self.store.cond.notify_all()
        return len(watches)

    def blank_line(self) -> int:
        """Send an empty line on every open watch stream (between events, as a keep-alive); returns how many."""
        with self._lock:
            watches = list(self._watches)
        with self.store.cond:
            for w in watches:
                w.blanks += 1
            self.store.cond.notify_all()
        return len(watches)

    def _add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _fault_for(self, resource: str | None, verb: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(resource, verb):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def asked(self, resource: str | None = None, verb: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if resource in (None, r.resource) and verb in (None, r.verb)]

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    # -- watch ----------------------------------------------------------------------------------------------------

    def _events(self, resource, ns, fsel, lsel, rv, timeout, bookmarks, me: _Watch):
        store = self.store

        def match(o):
            return o is not None and ns in (None, o["metadata"].get("namespace")) and fsel(o) and lsel(o)

        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + self.bookmark_interval
        with store.cond:
            if rv in (None, "", "0"):
                # no resourceVersion: synthetic ADDED events for the current state, as the real server sends
                initial = [copy.deepcopy(o) for (r, _, _), o in sorted(store.objs.items(), key=lambda kv: str(kv[0]))
                           if r == resource and match(o)]
                last = store.rv
            else:
                last = int(rv)
                if last < store.compacted:
                    yield {"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {last} ({store.compacted})").status()}
                    return
                if last > store.rv:
                    # a version this server has not reached (another replica's): a real one's watch cache waits up
                    # to 3s for it, then answers in the stream, as the list answers with a 504
                    yield {"type": "ERROR", "object": ApiError(
                        504, "Timeout", f"Too large resource version: {last}, current: {store.rv}",
                        {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]},
                        retry_after=1).status()}
                    return
                initial = []
        for o in initial:
            yield {"type": "ADDED", "object": o}
        while not me.cut and not self._stopping:
            with store.cond:
                store.cond.wait_for(lambda last=last: me.cut or self._stopping or me.blanks
                                    or (store.events and store.events[-1][0] > last),
                                    timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                pending = [e for e in store.events if e[0] > last and e[1] == resource]
                if store.events:
                    last = max(last, store.events[-1][0])
                current = store.rv
                blanks, me.blanks = me.blanks, 0
            if me.cut or self._stopping:
                return
            for _ in range(blanks):
                yield None
            for _, _, etype, new, old in pending:
                was = match(old) if etype != "ADDED" else False
                now = match(new) if etype != "DELETED" else False
                if etype == "DELETED":
                    kind = "DELETED" if was else None
                elif was and now:
                    kind = "MODIFIED"
                elif now:
                    kind = "ADDED"
                elif was:
                    kind = "DELETED"  # left the selector (e.g. a label change)
                else:
                    kind = None
                if kind:
                    yield {"type": kind, "object": new}
            if bookmarks and time.monotonic() >= next_bookmark:
                gv, kind_name = RESOURCES[resource][:2]
                yield {"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": gv,
                                                      "metadata": {"resourceVersion": str(current)}}}
                next_bookmark = time.monotonic() + self.bookmark_interval
            if time.monotonic() >= deadline:
                return


# ---------------------------------------------------------------------------------------------------------
# Object builders for tests


def pod(name: str, node: str | None, uid: str | None = None, labels: dict | None = None,
        annotations: dict | None = None, owner: tuple[str, str] | None = None,
        containers: dict[str, str] | None = None, container_ids: dict[str, str] | None = None,
        ip: str | None = None, phase: str = "Running", host_network: bool = False) -> dict:
    """A pod object; `containers` name -> image; `container_ids` name -> runtime id (containerd://<64 hex>)."""
    containers = containers or {"main": "registry.example.com/ml/trainer:1.4"}
    md: dict = {"name": name, "labels": labels or {}, "annotations": annotations or {}}
    if uid:
        md["uid"] = uid
    if owner:
        md["ownerReferences"] = [{"apiVersion": "v1", "kind": owner[0], "name": owner[1], "uid": str(uuid.uuid4()),
                                  "controller": True}]
    status: dict = {"phase": phase, "startTime": "2026-11-24T18:00:00Z"}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    if container_ids:
        status["containerStatuses"] = [{"name": n, "containerID": cid, "image": containers.get(n, ""), "ready": True,
                                        "restartCount": 0, "imageID": ""} for n, cid in container_ids.items()]
    spec: dict = {"containers": [{"name": n, "image": img} for n, img in containers.items()]}
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": md, "spec": spec, "status": status}


def owned(kind: str, name: str, owner: tuple[str, str] | None = None, labels: dict | None = None) -> dict:
    """A workload object (ReplicaSet, Job, ...) optionally owned by another (Deployment, CronJob)."""
    md: dict = {"name": name, "labels": labels or {}}
    if owner:
        md["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                  "uid": str(uuid.uuid4()), "controller": True}]
    return {"metadata": md, "spec": {}}
