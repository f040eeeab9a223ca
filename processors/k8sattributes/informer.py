"""The API-server side of k8sattributes: client setup, list/watch reflectors, owner lookups and the pod cache.

Everything here runs on the informer threads (owner lookups on a thread of their own); the processing path only
reads the cache (dict lookups under a short lock). A reflector lists once, then watches from the list's
resourceVersion with bookmarks, re-watches from the last resourceVersion when a watch ends or breaks, and lists
again only on 410 Gone — as client-go's reflector does. During an outage the cache keeps its last state and keeps
serving.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

# the kubernetes client library, loaded without the parts podmeter does not use (see kube.py)
from .kube import Api, ApiException, client, watch

log = logging.getLogger(__name__)

# The in-cluster service account mount; a module constant so tests can point it at a temporary directory.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# a list-and-watch round refused for its version (410, "Too large") sooner than this after its list backs off
# before listing again
RELIST_ROUND_MIN = 30.0
EMPTY: MappingProxyType = MappingProxyType({})


class Gone(Exception):
    """The watch's resourceVersion was compacted away (410): list again."""


class ConfigurationError(Exception):
    """The client cannot be configured (no kubeconfig, not in a cluster); the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Client


class _TokenFile:
    """Re-reads the service account token when kubelet rotates it (the projected volume swaps a symlink, so the
    file's inode and mtime change); a stat per request, a read only on change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple | None = None
        self.token = ""
        self.refresh()

    def refresh(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as f:
                    self.token = f.read().strip()
                self._stamp = stamp
        except OSError as exc:
            if not self.token:
                raise ConfigurationError(f"cannot read the service account token {self.path}: {exc.strerror}") from None
        return self.token

    def hook(self, conf: client.Configuration) -> None:
        conf.api_key["authorization"] = self.refresh()


def build_api_client(auth_type: str, kube_config_path: str = "", context: str = "") -> client.ApiClient:
    conf = client.Configuration()
    if auth_type == "kubeConfig":
        from kubernetes import config as kconfig  # imported here, on first use (see kube.py)
        from kubernetes.config.config_exception import ConfigException

        path = kube_config_path or os.environ.get("KUBECONFIG") or "~/.kube/config"
        path = os.pathsep.join(os.path.expanduser(p) for p in path.split(os.pathsep))
        try:
            kconfig.load_kube_config(config_file=path, context=context or None, client_configuration=conf,
                                     persist_config=False)
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot load kubeconfig {path}: {exc}") from None
    elif auth_type == "serviceAccount":
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ConfigurationError("not running in a pod (KUBERNETES_SERVICE_HOST/PORT unset); use auth_type "
                                     "kubeConfig outside a cluster, or none")
        if ":" in host:
            host = f"[{host}]"
        conf.host = f"https://{host}:{port}"
        ca = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
        if not os.path.exists(ca):
            raise ConfigurationError(f"the service account CA {ca} is missing (is automountServiceAccountToken off?)")
        conf.ssl_ca_cert = ca
        token = _TokenFile(os.path.join(SERVICE_ACCOUNT_DIR, "token"))
        conf.api_key["authorization"] = token.token
        conf.api_key_prefix["authorization"] = "Bearer"
        conf.refresh_api_key_hook = token.hook
    else:
        raise ConfigurationError(f"auth_type {auth_type} has no API client")
    # our own loop retries with backoff; urllib3's retries would only hide outages and stretch deadlines
    conf.retries = False
    return client.ApiClient(conf)


class _RawWatch(watch.Watch):
    """Watch yielding the event JSON as dicts: no model deserialization (costly, and we read few fields)."""

    def get_return_type(self, func):
        return None

    def unmarshal_event(self, data, return_type):
        event = super().unmarshal_event(data, return_type)
        if isinstance(event, dict) and event.get("type") == "ERROR":
            # The library raises an ApiException for an ERROR event with only its code and message, dropping the
            # Status's details: the cause that says "Too large resource version" and details.retryAfterSeconds.
            # Raised here instead, before it sees the event, with the Status as the body, as for an HTTP error.
            raise watch_error(event.get("raw_object"))
        return event


def watch_error(status: object) -> ApiException:
    """The ApiException for the Status of a watch's ERROR event (its body is the Status, as an error response's)."""
    status = status if isinstance(status, dict) else {}
    code = status.get("code")
    exc = ApiException(status=code if isinstance(code, int) else None,
                       reason=f"{status.get('reason') or ''}: {status.get('message') or ''}".strip(": "))
    exc.body = json.dumps(status)
    return exc


def _status_body(exc: BaseException) -> dict:
    try:
        body = json.loads(exc.body) if isinstance(exc, ApiException) and exc.body else {}
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def too_large_resource_version(exc: BaseException) -> bool:
    """The API server's "Too large resource version" (504 Timeout, cause ResourceVersionTooLarge; servers before
    1.18.6 say it only in the message), as client-go's reflector recognises it."""
    if not isinstance(exc, ApiException) or exc.status != 504:
        return False
    body = _status_body(exc)
    causes = (body.get("details") or {}).get("causes") or []
    return (any(isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes)
            or "Too large resource version" in str(body.get("message") or ""))


def retry_after(exc: BaseException) -> float:
    """Seconds an error response asks the client to wait (its Retry-After header, else the Status's
    details.retryAfterSeconds); 0 when it does not say."""
    if not isinstance(exc, ApiException):
        return 0.0
    value = None
    try:
        value = (exc.headers or {}).get("Retry-After")
    except (AttributeError, TypeError):
        pass
    if value is None:
        value = (_status_body(exc).get("details") or {}).get("retryAfterSeconds")
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except (TypeError, ValueError):  # an HTTP date: not sent by the API server
        return 0.0


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        # (a body that is JSON but not a Status, as a proxy may send: `null`, a list, a string, gives the reason)
        return f"HTTP {exc.status}: {_status_body(exc).get('message') or exc.reason or ''}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Reflector


@dataclass
class Resource:
    """What one reflector lists and watches."""

    name: str  # "pods", "namespaces"
    group: str  # "" or "apps" (for the permission message)
    list_fn: Callable  # e.g. CoreV1Api.list_pod_for_all_namespaces
    kwargs: dict = field(default_factory=dict)  # field_selector, label_selector, namespace


class Reflector:
    """List, then watch from the resourceVersion with bookmarks; re-watch on timeouts, relist on 410,
    back off on errors. `on_replace(items)` gets each full list, `on_event(type, obj)` each change."""

    def __init__(self, resource: Resource, on_replace: Callable[[list[dict]], None],
                 on_event: Callable[[str, dict], None], *, telemetry, restarts, request_timeout: float,
                 watch_timeout: float, backoff: tuple[float, float]) -> None:
        self.resource = resource
        self.on_replace, self.on_event = on_replace, on_event
        self.telemetry = telemetry
        self.restarts = restarts  # counter labelled (resource, reason)
        self.request_timeout = request_timeout
        self.watch_timeout = max(1, int(watch_timeout))
        self.backoff_initial, self.backoff_max = backoff
        self.synced = threading.Event()  # first list done
        self.settled = threading.Event()  # first list done, or a failure that waiting will not fix (403, 401)
        self.forbidden = False
        self.last_sync = 0.0  # monotonic time the cache was last confirmed current (list, event, bookmark)
        self.rv: str | None = None
        # The resourceVersion a list asks for, as client-go's reflector does: "0" (any, served from the API server's
        # watch cache) at first; after a 410 on the watch, the last one seen ("not older than", also from the cache);
        # "" (a consistent read from etcd) only after a list got 410. A list without one is a quorum read: etcd reads
        # every pod of the cluster and the field selector filters afterwards, from every node's agent at once after
        # an API server restart.
        self._list_rv = "0"
        self._stop = threading.Event()
        self._watch: _RawWatch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"k8sattributes-{self.resource.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()  # shuts the socket down, unblocking the read
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def verb_resource(self) -> str:
        r = self.resource
        return f"{r.name}.{r.group}" if r.group else r.name

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stop.is_set():
            started = time.monotonic()
            listed = self.rv is None
            try:
                if listed:
                    self._list()
                events = self._watch_once()
                if events == 0 and time.monotonic() - started < 1.0:
                    # a watch the server ends at once, again and again, must not become a busy loop
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff_max)
                else:
                    delay = self.backoff_initial
            except Gone:
                self.restarts.labels(self.resource.name, "expired").inc()
                self._list_rv = self.rv or "0"
                self.rv = None  # relist: the server told us our view is too old
                if time.monotonic() - started < 1.0:
                    # 410 right after a list: a server this confused gets backoff, not a relist storm
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff_max)
            except Exception as exc:
                if self._stop.is_set():
                    return
                delay = self._failed(exc, delay, time.monotonic() - started if listed else float("inf"))

    def _failed(self, exc: Exception, delay: float, elapsed: float = float("inf")) -> float:
        """Count and report a failed list or watch, wait as it calls for; returns the next backoff delay.
        `elapsed`: since this round began, when it began with a list (else infinite)."""
        status = exc.status if isinstance(exc, ApiException) else None
        reason = {403: "forbidden", 401: "unauthorized", 410: "expired"}.get(status, "error")
        too_large = too_large_resource_version(exc)
        if status == 410 or too_large:
            # 410: compacted away. 504 "Too large resource version": this API server's watch cache has not reached
            # it (it came from another replica; the cache moves only with that resource's changes, so in a quiet
            # cluster maybe never). Either way a list refused for its version reads from etcd once, as client-go
            # does (kubernetes#91073). A watch refused with 410 lists again from the watch cache, not older than the
            # last version seen; one refused as too large (an HTTP status, or an ERROR event in its stream) reads
            # from etcd at once: a list from the cache at that version would only be refused the same way after the
            # server waited 3s for it (client-go's watch-list marks the version unavailable alike)
            self._list_rv = "" if self.rv is None or too_large else self.rv
            self.rv = None
            self.restarts.labels(self.resource.name, "expired").inc()
            if elapsed < RELIST_ROUND_MIN:
                # refused again soon after a list: an API server whose cache stays behind would otherwise have every
                # node list its pods from etcd back to back (client-go backs off between list-and-watch rounds too)
                self._stop.wait(delay * random.uniform(0.5, 1.0))
                return min(delay * 2, self.backoff_max)
            return delay
        if status == 403:
            self.forbidden = True
            verb = "list" if self.rv is None else "watch"
            self.telemetry.error(f"forbidden_{self.resource.name}",
                                 f"the API server forbids {verb} on {self.verb_resource} ({describe(exc)}); grant list "
                                 f"and watch on {self.verb_resource} to podmeter's service account. Going on "
                                 "with CRI metadata; retrying in the background")
            self.settled.set()
            delay = self.backoff_max  # RBAC changes are slow: retry at the longest interval
        elif status == 401:
            self.telemetry.error("unauthorized", f"the API server rejected podmeter's credentials ({describe(exc)}); "
                                                 "retrying (a rotated token is re-read)")
            self.settled.set()
        else:
            self.telemetry.error(f"api_{self.resource.name}",
                                 f"{'list' if self.rv is None else 'watch'} {self.verb_resource} failed: "
                                 f"{describe(exc)}; serving cached metadata, retrying with backoff")
        self.restarts.labels(self.resource.name, reason).inc()
        wait = delay * random.uniform(0.5, 1.0)
        # a 429 (API Priority and Fairness) or 5xx that says when to come back is not asked again sooner, as
        # client-go's REST client waits; still bounded by reconnect.max_interval
        wait = max(wait, min(retry_after(exc), self.backoff_max))
        self._stop.wait(wait)
        return min(delay * 2, self.backoff_max)

    def _list(self) -> None:
        r = self.resource
        resp = r.list_fn(**r.kwargs, resource_version=self._list_rv or None, _preload_content=False,
                         _request_timeout=(5, self.request_timeout))
        doc = json.loads(resp.data)
        items = doc.get("items") or []
        self.on_replace(items)
        self.rv = (doc.get("metadata") or {}).get("resourceVersion") or "0"
        self._list_rv = "0"
        self._ok()
        self.synced.set()
        self.settled.set()

    def _ok(self) -> None:
        self.last_sync = time.monotonic()
        if self.forbidden:
            self.forbidden = False
            self.telemetry.recovered(f"forbidden_{self.resource.name}")
        self.telemetry.recovered(f"api_{self.resource.name}")
        self.telemetry.recovered("unauthorized")

    def _watch_once(self) -> int:
        """One watch request; returns how many events (bookmarks included) it brought."""
        r = self.resource
        w = self._watch = _RawWatch()
        count = 0
        try:
            # the read timeout catches silent dead connections: the server ends each watch at timeout_seconds
            stream = w.stream(r.list_fn, **r.kwargs, resource_version=self.rv, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout,
                              _request_timeout=(5, self.watch_timeout + self.request_timeout))
            for event in stream:
                if self._stop.is_set():
                    return count
                if not isinstance(event, dict):
                    # a blank line (proxies send them as keep-alives) or one that is not JSON: the library yields
                    # None for it. Not an event, and not a reason to drop a working watch
                    continue
                count += 1
                etype, obj = event.get("type"), event.get("raw_object") or event.get("object") or {}
                if etype == "ERROR":  # (normally raised by _RawWatch before it gets here)
                    raise watch_error(obj)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(etype, obj)
                if rv:
                    self.rv = rv
                self._ok()
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from None
            raise
        finally:
            self._watch = None
        # a watch that ended normally (server-side timeout) proves the connection and the view are current
        self._ok()
        return count


# ---------------------------------------------------------------------------------------------------------
# Owners


class OwnerResolver:
    """(kind, namespace, name) of a ReplicaSet or Job -> its controller (kind, name), by cached GETs.

    Bounded (LRU) and expiring. A lookup that failed for a reason that passes (5xx, 429, a timeout, a refused or
    cut connection, 401 before the token is re-read) is retried in the background with backoff, and
    `on_resolved(keys)` is told what it found, so a pod does not lack its workload name until its next event
    (which for a long training Job can be days away). While a key waits for its retry, lookups of it are answered
    "unknown" without asking the API server. A 404 (the owner is gone) and a 403 (no permission: reported, and
    asked again at most every FAILURE_TTL when pods come) are not retried.

    The informer threads never make these GETs: they store a pod's record with what is cached and `submit` the
    owners that are not, which this class's thread looks up at once (then `on_resolved`). An API server that hangs
    on ReplicaSet or Job GETs (up to request_timeout each) so delays workload names, never the pods' own metadata
    or the watch's next events."""

    FAILURE_TTL = 30.0
    RETRIES_PER_PASS = 16  # GETs one retry pass makes at most; a pass also ends at the first failure

    def __init__(self, api: Api | None, ttl: float, telemetry, request_timeout: float,
                 max_entries: int = 4096, backoff: tuple[float, float] = (1.0, 30.0),
                 on_resolved: Callable[[list[tuple[str, str, str]]], None] | None = None,
                 in_use: Callable[[], set] | None = None) -> None:
        self.api = api
        self.ttl = ttl
        self.telemetry = telemetry
        self.request_timeout = request_timeout
        self.max_entries = max_entries
        self.backoff_initial, self.backoff_max = backoff
        self.on_resolved = on_resolved  # called on the retry thread with the keys whose owner was found
        self.in_use = in_use  # the (kind, namespace, name) live pods still need: others are not retried
        self._cache: OrderedDict[tuple[str, str, str], tuple[float, tuple[str, str] | None]] = OrderedDict()
        # keys waiting for a retry, oldest first -> when each was scheduled (a sequence number, see retry_pass)
        self._retry: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._scheduled = 0
        # keys submitted for a first lookup (oldest first), and the events to set once they were looked up
        self._fresh: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._fresh_done: list[threading.Event] = []
        self._no_answer = False  # the last GET got no answer (timeout, refused or cut connection)
        self._not_before = 0.0  # monotonic: no retry sooner (a response's Retry-After, within max_interval)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gets = 0

    def owner(self, kind: str, namespace: str, name: str) -> tuple[str, str] | None:
        """The controller; NO_OWNER when the object has none; None when unknown (not readable now). A GET on this
        thread when not cached: the processor uses cached() and submit() instead; this drives the resolver
        directly (its tests)."""
        key = (kind, namespace, name)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            # while the API server fails, what it said last (expired, but better than nothing for a relist then)
            stale = hit[1] if hit is not None else None
            if key in self._retry:
                return stale  # the retry thread asks, with backoff: not once per pod event
        if self.api is None:
            return None
        outcome, result = self._get(key)
        if outcome == "retry":
            self._schedule_retry(key)
            return stale
        return result

    def cached(self, kind: str, namespace: str, name: str) -> tuple[bool, tuple[str, str] | None]:
        """(True, the controller) when a current answer is cached; else (False, what was known last, or None).
        Never asks the API server: for the informer threads, which `submit` what is not known."""
        with self._lock:
            key = (kind, namespace, name)
            hit = self._cache.get(key)
            if hit is None:
                return False, None
            self._cache.move_to_end(key)  # (least recently used first out)
            return hit[0] > time.monotonic(), hit[1]

    def submit(self, keys, done: threading.Event | None = None) -> None:
        """Have the owner thread look these keys up (those not cached, nor waiting for a retry, by then) and tell
        `on_resolved`; `done` is set once it did (or at stop)."""
        with self._lock:
            if self._stop.is_set():
                if done is not None:
                    done.set()
                return
            for key in keys:
                self._fresh[key] = None
            # bounded like the retries: the oldest then waits for its pods' next event (they keep what was known)
            while len(self._fresh) > self.max_entries:
                self._fresh.popitem(last=False)
            if done is not None and done not in self._fresh_done:
                self._fresh_done.append(done)
            self._start_thread()
        self._wake.set()

    def _lookup(self, keys: list[tuple[str, str, str]]) -> None:
        """First lookups (the owner thread). After a GET that got no answer the rest wait for the retries, which
        ask one at a time with backoff: a hanging API server costs one request_timeout here, not one per owner."""
        found = []
        for key in keys:
            if self._stop.is_set():
                return
            with self._lock:
                hit = self._cache.get(key)
                if (hit is not None and hit[0] > time.monotonic()) or key in self._retry:
                    continue  # cached meanwhile (its pods have it), or the retries ask
            if self._no_answer or self._not_before > time.monotonic():
                self._schedule_retry(key)  # (nor sooner than a Retry-After the API server asked for)
                continue
            outcome, _ = self._get(key)
            if outcome == "retry":
                self._schedule_retry(key)
            else:  # found, or final (404, 403): the pods' records are redone with the answer
                found.append(key)
        if found and self.on_resolved is not None:
            self.on_resolved(found)

    def _get(self, key: tuple[str, str, str]) -> tuple[str, tuple[str, str] | None]:
        """One GET: ("found", controller or NO_OWNER), ("final", None) for a 404 or 403, ("retry", None) for a
        failure that passes (its Retry-After, if any, holds back the retries). Caches what it learnt."""
        kind, namespace, name = key
        ttl = self.ttl
        resource = "replicasets.apps" if kind == "ReplicaSet" else "jobs.batch"
        # a missing permission is its own cause (as forbidden_pods): under owner_<kind>, shared with failures that
        # pass, its message (what to grant) was not logged when a 5xx or timeout came first, and went away with them
        forbidden = f"forbidden_{resource.partition('.')[0]}"
        outcome = "found"
        self._no_answer = False
        try:
            self.gets += 1
            fn = self.api.read_replica_set if kind == "ReplicaSet" else self.api.read_job
            resp = fn(name, namespace, _preload_content=False, _request_timeout=(5, self.request_timeout))
            result = controller_of(json.loads(resp.data)) or NO_OWNER
            self.telemetry.recovered(f"owner_{kind}")
            self.telemetry.recovered(forbidden)
        except ApiException as exc:
            result, ttl, outcome = None, self.FAILURE_TTL, "final"
            if exc.status == 404:
                pass  # the owner is gone: nothing to add
            elif exc.status == 403:
                self.telemetry.error(forbidden, f"the API server forbids get on {resource} ({describe(exc)}); grant "
                                                f"get on {resource} to podmeter's service account for workload names. "
                                                + ("Deployment names fall back to the pod-template-hash label"
                                                   if kind == "ReplicaSet" else "Pods of Jobs get no k8s.cronjob.name"))
            else:
                outcome, wait = "retry", retry_after(exc)
                if wait > 0:  # whichever thread asked: the retries wait for it
                    with self._lock:
                        self._not_before = max(self._not_before, time.monotonic() + min(wait, self.backoff_max))
                self.telemetry.error(f"owner_{kind}", f"get {resource} {namespace}/{name} failed: {describe(exc)}; "
                                                      "retrying in the background")
        except Exception as exc:  # timeouts, refused or cut connections, a body that is not JSON
            result, outcome = None, "retry"
            self._no_answer = not isinstance(exc, ValueError)
            self.telemetry.error(f"owner_{kind}", f"get {kind} {namespace}/{name} failed: {describe(exc)}; "
                                                  "retrying in the background")
        if outcome != "retry":
            with self._lock:
                self._cache[key] = (time.monotonic() + ttl, result)
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return outcome, result

    def _schedule_retry(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._scheduled += 1
            self._retry[key] = self._scheduled
            while len(self._retry) > self.max_entries:  # the oldest then waits for its pods' next event, as before
                self._retry.popitem(last=False)
            self._start_thread()
        self._wake.set()

    def _start_thread(self) -> None:
        """(Under the lock.)"""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="k8sattributes-owners", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        delay = self.backoff_initial
        due = None  # when the next retry pass runs (None: no retry waiting)
        while not self._stop.is_set():
            with self._lock:
                fresh, done = list(self._fresh), self._fresh_done
                self._fresh, self._fresh_done = OrderedDict(), []
                waiting = bool(self._retry)
                if not fresh:
                    self._wake.clear()
            if fresh or done:
                try:
                    self._lookup(fresh)  # at once: first lookups do not wait for the retries' backoff
                finally:
                    for event in done:
                        event.set()
                continue
            now = time.monotonic()
            if not waiting:
                due = None
                self._wake.wait()
                continue
            if due is None:
                due = now + delay * random.uniform(0.5, 1.0)
            # no sooner than a Retry-After (already bounded by max_interval; maybe answered to a first lookup made
            # meanwhile): jitter must not undercut it
            wake_at = max(due, self._not_before)
            if now < wake_at:
                self._wake.wait(wake_at - now)  # (woken early by a submit: its lookups, then back to waiting)
                continue
            failed = self.retry_pass()
            # the API server still fails: back off
            delay = min(delay * 2, self.backoff_max) if failed else self.backoff_initial
            due = None

    def retry_pass(self) -> bool:
        """Retry up to RETRIES_PER_PASS waiting lookups, oldest first; stop at the first that fails again (the
        others wait for the backoff). Returns whether one failed."""
        with self._lock:
            # keys scheduled after this may belong to pods in_use() does not see yet (their lookup failed while the
            # pass ran): not dropped by this pass. A key is scheduled only after its pod was stored (under the
            # processor's records lock, before the owner was submitted), so one scheduled before in_use() takes that
            # lock has its pod counted
            known = self._scheduled
        wanted = self.in_use() if self.in_use is not None else None
        found: list[tuple[str, str, str]] = []
        failed = False
        for _ in range(self.RETRIES_PER_PASS):
            if self._stop.is_set():
                break  # shut down while a GET was in flight: ask nothing more
            with self._lock:
                if not self._retry:
                    break
                key, scheduled = next(iter(self._retry.items()))
                if wanted is not None and key not in wanted and scheduled <= known:
                    del self._retry[key]  # no live pod needs it any more
                    continue
            outcome, _ = self._get(key)
            with self._lock:
                if outcome == "retry":
                    if key in self._retry:  # (dropped meanwhile when the list overflowed)
                        self._retry.move_to_end(key)  # the next pass starts with the others
                else:
                    self._retry.pop(key, None)
            if outcome == "retry":
                failed = True
                break
            if outcome == "found":
                found.append(key)
        if found and self.on_resolved is not None:
            self.on_resolved(found)
        return failed

    def pending(self) -> int:
        return len(self._retry)

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._stop.set()
            done, self._fresh_done = self._fresh_done, []
        for event in done:  # nobody waits for lookups that will not be made
            event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __len__(self) -> int:
        return len(self._cache)


NO_OWNER: tuple[str, str] = ("", "")  # an owner lookup's answer for an object that has no owner (orphaned)


def controller_of(obj: dict) -> tuple[str, str] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return ref.get("kind", ""), ref.get("name", "")
    return (refs[0].get("kind", ""), refs[0].get("name", "")) if refs else None


# ---------------------------------------------------------------------------------------------------------
# Pod records and the cache


def parse_image(ref: str) -> tuple[str | None, str | None]:
    """`registry:5000/ns/app:1.2@sha256:...` -> ("registry:5000/ns/app", "1.2"); a digest-only ref -> (name, None)."""
    ref = (ref or "").strip()
    if not ref or ref.startswith("sha256:"):
        return None, None
    name = ref.partition("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, ("latest" if "@" not in ref else None)


def normalise_container_id(cid: str) -> str:
    return cid.rpartition("://")[2] if "://" in cid else cid


_POD_SUFFIX = re.compile(r"-[a-z0-9]{5}$")


def deployment_from_hash(replicaset: str, labels: dict) -> str | None:
    """A Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>`: the fallback when the
    ReplicaSet cannot be read (no permission, CRI metadata only)."""
    h = labels.get("pod-template-hash")
    if h and replicaset.endswith("-" + h) and len(replicaset) > len(h) + 1:
        return replicaset[: -len(h) - 1]
    return None


@dataclass(frozen=True)
class PodRecord:
    uid: str
    name: str
    namespace: str
    ip: str  # the IP to index the pod by ("" for host-network, completed and not-yet-started pods)
    labels: MappingProxyType
    # (no annotations: nothing reads them after extraction, and kubectl's last-applied-configuration alone can be
    # hundreds of KiB per pod; the extracted ones are in attrs)
    attrs: MappingProxyType  # pod-level resource attributes (metadata + pod labels/annotations), precomputed
    images: MappingProxyType  # container name -> (image name, image tag)
    container_ids: MappingProxyType  # container id -> container name
    deleted_at: float | None = None
    started: str = ""  # status.startTime (RFC 3339, UTC: compares as text): which pod an IP belongs to now
    mirror_uid: str = ""  # a static pod's uid on the node (its cgroup, CRI sandbox): kubernetes.io/config.mirror
    runtime: str = ""  # container.runtime.name, from the scheme of its containers' ids (containerd://...)
    owner: tuple[str, str] | None = None  # its controller (kind, name): owner lookups retried later update it
    workload_keys: frozenset = frozenset()  # the attrs that came from its owners (not overridden by a rule)


class PodCache:
    """Pods by uid with indexes by (namespace, name), IP and container id. Deleted pods stay for a grace period.

    `generation` goes up after every change a reader could see (a pod added, changed, marked deleted or swept),
    never before it: a reader that saw generation G before reading knows its results are current while it is
    still G."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.generation = 0
        self._next_expiry = float("inf")  # when the first deleted pod's grace period ends
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self._by_name: dict[tuple[str, str], str] = {}
        self._by_ip: dict[str, str] = {}
        self._by_cid: dict[str, str] = {}
        self._by_mirror: dict[str, str] = {}  # static pod uid on the node -> mirror pod uid

    # -- reads (processing path) ---------------------------------------------------------------------------

    def get(self, uid: str) -> PodRecord | None:
        rec = self._pods.get(uid)
        if rec is None and self._by_mirror:
            # a static pod: the node knows it by kubelet's uid, the API server's mirror pod has its own
            api_uid = self._by_mirror.get(uid)
            rec = self._pods.get(api_uid) if api_uid else None
        return rec

    def by_name(self, namespace: str, name: str) -> PodRecord | None:
        uid = self._by_name.get((namespace, name))
        return self._pods.get(uid) if uid else None

    def by_ip(self, ip: str) -> PodRecord | None:
        uid = self._by_ip.get(ip)
        return self._pods.get(uid) if uid else None

    def by_container(self, cid: str) -> PodRecord | None:
        uid = self._by_cid.get(cid)
        return self._pods.get(uid) if uid else None

    def counts(self) -> tuple[int, int]:
        with self._lock:
            deleted = sum(1 for p in self._pods.values() if p.deleted_at is not None)
            return len(self._pods) - deleted, deleted

    def __len__(self) -> int:
        return len(self._pods)

    def uids(self) -> list[str]:
        return list(self._pods)

    # -- writes (informer thread) -----------------------------------------------------------------------------

    def upsert(self, rec: PodRecord) -> None:
        with self._lock:
            old = self._pods.get(rec.uid)
            if old is not None:
                if old == rec and self._indexed(rec):
                    return  # a resync or a change of fields not kept: nothing a reader sees
                self._unindex(old)
            self._pods[rec.uid] = rec
            self._index(rec)
            self.generation += 1

    def delete(self, uid: str, now: float | None = None) -> None:
        with self._lock:
            rec = self._pods.get(uid)
            if rec is not None and rec.deleted_at is None:
                # a live pod with the same name or IP wins the index from now on; this one keeps its uid and ids
                at = time.monotonic() if now is None else now
                self._pods[uid] = _replace(rec, deleted_at=at)
                self._next_expiry = min(self._next_expiry, at + self.grace)
                self.generation += 1

    def replace(self, records: list[PodRecord]) -> None:
        """A full list: pods absent from it were deleted while we were not watching."""
        seen = {r.uid for r in records}
        now = time.monotonic()
        with self._lock:  # a processing thread's sweep may remove pods meanwhile
            absent = [u for u in self._pods if u not in seen]
        for uid in absent:
            self.delete(uid, now)
        for rec in records:
            self.upsert(rec)

    def sweep(self, now: float | None = None) -> int:
        """Remove the deleted pods whose grace period is over; cheap (one comparison) while none is."""
        now = time.monotonic() if now is None else now
        if now < self._next_expiry:
            return 0
        with self._lock:
            gone = [p for p in self._pods.values() if p.deleted_at is not None and now - p.deleted_at >= self.grace]
            for rec in gone:
                self._unindex(rec)
                del self._pods[rec.uid]
            self._next_expiry = min((p.deleted_at + self.grace for p in self._pods.values()
                                     if p.deleted_at is not None), default=float("inf"))
            if gone:
                self.generation += 1
            return len(gone)

    def _index(self, rec: PodRecord) -> None:
        self._by_name[(rec.namespace, rec.name)] = rec.uid
        if self._takes_ip(rec):
            self._by_ip[rec.ip] = rec.uid
        for cid in rec.container_ids:
            self._by_cid[cid] = rec.uid
        if rec.mirror_uid:
            self._by_mirror[rec.mirror_uid] = rec.uid

    def _takes_ip(self, rec: PodRecord) -> bool:
        """Whether the pod gets its IP's index entry: not from a live pod that started later (an old pod's update
        arriving after the CNI gave its IP to a new pod; the collector's k8sattributes guards the same way)."""
        if not rec.ip:
            return False
        holder = self._pods.get(self._by_ip.get(rec.ip, ""))
        return (holder is None or holder.uid == rec.uid or holder.deleted_at is not None or not rec.started
                or rec.started >= holder.started)

    def _indexed(self, rec: PodRecord) -> bool:
        uid = rec.uid
        return (self._by_name.get((rec.namespace, rec.name)) == uid
                and (not self._takes_ip(rec) or self._by_ip.get(rec.ip) == uid)
                and all(self._by_cid.get(cid) == uid for cid in rec.container_ids)
                and (not rec.mirror_uid or self._by_mirror.get(rec.mirror_uid) == uid))

    def _unindex(self, rec: PodRecord) -> None:
        # only entries still pointing at this pod: a newer pod may have taken the name or the IP
        if self._by_name.get((rec.namespace, rec.name)) == rec.uid:
            del self._by_name[(rec.namespace, rec.name)]
        if rec.ip and self._by_ip.get(rec.ip) == rec.uid:
            del self._by_ip[rec.ip]
        if rec.mirror_uid and self._by_mirror.get(rec.mirror_uid) == rec.uid:
            del self._by_mirror[rec.mirror_uid]
        for cid in rec.container_ids:
            if self._by_cid.get(cid) == rec.uid:
                del self._by_cid[cid]


def _replace(rec: PodRecord, **changes) -> PodRecord:
    from dataclasses import replace

    return replace(rec, **changes)
