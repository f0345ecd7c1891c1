#!/usr/bin/env python3
"""scripts/probe.py: hostile clients against a running Updraft, while a campaign runs.

Started by scripts/probe.sh, which starts the server, provisions what the checks need and exports:
UPDRAFT_* (the listeners, the data directory), PROBE_SERVER_PID, PROBE_TASK, PROBE_DEVICES,
PROBE_TASK_STARTED (epoch seconds), PROBE_PROJECT, PROBE_AK, PROBE_SK, PROBE_SUB_SECRET and
PROBE_UPDRAFT_SECRET (the secrets of the MQTT devices `probe-sub` and `updraft`, product `probe`), and
optionally PROBE_CAMPAIGN_WAIT (seconds, default 600).

Each check prints `[probe] PASS|FAIL <name>: <numbers>`; a summary table, the server's peak RSS (VmHWM) and
its most open descriptors follow. Exit status 1 when a check failed or the peak RSS reached 1 GiB.
Standard library only.
"""

import collections
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import secrets
import socket
import sqlite3
import ssl
import statistics
import struct
import sys
import threading
import time
import urllib.parse

# --- the environment --------------------------------------------------------------------------------


def listen_addr(key):
    """`127.0.0.1:1234` from an UPDRAFT_* variable, as (host, port); 0.0.0.0 reached on 127.0.0.1."""
    host, port = os.environ[key].rsplit(":", 1)
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, int(port)


HTTPS = listen_addr("UPDRAFT_HTTP__LISTEN")
MQTT = listen_addr("UPDRAFT_MQTT__LISTEN")
COAP = listen_addr("UPDRAFT_LWM2M__LISTEN")
HOST_HEADER = f"127.0.0.1:{HTTPS[1]}"
ORIGIN = f"https://{HOST_HEADER}"
SERVER_PID = int(os.environ["PROBE_SERVER_PID"])
TASK = os.environ["PROBE_TASK"]
DEVICES = int(os.environ.get("PROBE_DEVICES", "1000"))
TASK_STARTED = float(os.environ.get("PROBE_TASK_STARTED", time.time()))
CAMPAIGN_WAIT = float(os.environ.get("PROBE_CAMPAIGN_WAIT", "600"))
PROJECT = os.environ["PROBE_PROJECT"]
AK = os.environ["PROBE_AK"]
SK = os.environ["PROBE_SK"]
ADMIN = os.environ.get("UPDRAFT_ADMIN__USERNAME", "admin")
GIB = 1 << 30

TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE

# Errors that mean "the peer closed or cut the connection" (timeouts are not among them).
CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError, ssl.SSLZeroReturnError)

RESULTS = []  # (name, passed, numbers)


def report(name, passed, numbers):
    """Records a check's outcome and prints its line."""
    RESULTS.append((name, passed, numbers))
    print(f"[probe] {'PASS' if passed else 'FAIL'} {name}: {numbers}", flush=True)


def log(msg):
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


# --- HTTPS helpers ----------------------------------------------------------------------------------


def https(source=None, timeout=10):
    """An HTTPS connection to the server (certificate not checked), from `source` when given."""
    return http.client.HTTPSConnection(
        HTTPS[0], HTTPS[1], timeout=timeout, context=TLS, source_address=(source, 0) if source else None
    )


def healthz(source=None, timeout=5):
    """GET /healthz on a fresh connection: (status or None, seconds)."""
    t0 = time.monotonic()
    try:
        c = https(source, timeout)
        c.request("GET", "/healthz")
        r = c.getresponse()
        r.read()
        c.close()
        return r.status, time.monotonic() - t0
    except (OSError, http.client.HTTPException):
        return None, time.monotonic() - t0


class HealthSampler(threading.Thread):
    """Samples /healthz (from 127.0.0.1) every `interval` seconds until stopped."""

    def __init__(self, interval):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples = []  # (status, seconds)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(healthz())
            self.stop.wait(self.interval)

    def finish(self):
        self.stop.set()
        self.join()
        return self.samples


def tls_socket(source=None, timeout=10):
    """A raw TLS socket to the HTTPS port, handshake done."""
    raw = socket.create_connection(HTTPS, timeout=timeout, source_address=(source, 0) if source else None)
    return TLS.wrap_socket(raw, server_hostname="localhost")


def sdk_date():
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def signed_api(method, path, body):
    """A `/v5` request signed with SDK-HMAC-SHA256 (PROBE_AK/PROBE_SK): (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else b""
    headers = {"content-type": "application/json", "host": HOST_HEADER, "x-sdk-date": sdk_date()}
    names = sorted(headers)
    uri = "/".join(urllib.parse.quote(urllib.parse.unquote(s), safe="~") for s in path.split("/"))
    if not uri.endswith("/"):
        uri += "/"
    canonical = "\n".join(
        [
            method,
            uri,
            "",
            "".join(f"{n}:{headers[n].strip()}\n" for n in names),
            ";".join(names),
            hashlib.sha256(data).hexdigest(),
        ]
    )
    to_sign = f"SDK-HMAC-SHA256\n{headers['x-sdk-date']}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(SK.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders={';'.join(names)}, Signature={signature}"
    c = https()
    c.request(method, path, body=data or None, headers=headers)
    r = c.getresponse()
    text = r.read().decode(errors="replace")
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


# --- MQTT helpers -----------------------------------------------------------------------------------


def varint(n):
    """MQTT's remaining-length encoding."""
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def iotda_login(device_id, secret):
    """IoTDA's client id (signature type 0) and password for the current UTC hour."""
    hour = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H")
    password = hmac.new(hour.encode(), secret.encode(), hashlib.sha256).hexdigest()
    return f"{device_id}_0_0_{hour}", password


def connect_packet(client_id, username, password, keepalive=60):
    """An MQTT 3.1.1 CONNECT with user name and password, clean session."""
    body = mqtt_str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", keepalive)
    body += mqtt_str(client_id) + mqtt_str(username) + mqtt_str(password)
    return b"\x10" + varint(len(body)) + body


class Mqtt:
    """A hand-made MQTT 3.1.1 client: one blocking socket, packets read whole."""

    def __init__(self, timeout=5):
        self.sock = socket.create_connection(MQTT, timeout=timeout)
        self.buf = b""

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self, timeout=5):
        """The next packet as (first byte, body); ConnectionResetError when closed, TimeoutError on silence."""
        self.sock.settimeout(timeout)
        first = self._exact(1)[0]
        length, shift = 0, 0
        for _ in range(4):
            b = self._exact(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return first, self._exact(length)

    def login(self, device_id, secret):
        """CONNECT as the device: the CONNACK return code, or None when closed without one."""
        client_id, password = iotda_login(device_id, secret)
        self.sock.sendall(connect_packet(client_id, device_id, password))
        try:
            first, body = self.read()
        except CLOSED:
            return None
        return body[1] if first >> 4 == 2 and len(body) >= 2 else None

    def subscribe(self, packet_id, topic, qos=1):
        """SUBSCRIBE one filter: the SUBACK return code, or None when the connection closed."""
        body = struct.pack("!H", packet_id) + mqtt_str(topic) + bytes([qos])
        try:
            self.sock.sendall(b"\x82" + varint(len(body)) + body)
            while True:
                first, body = self.read()
                if first >> 4 == 9 and body[:2] == struct.pack("!H", packet_id):
                    return body[2]
        except CLOSED:
            return None
        except (TimeoutError, socket.timeout):
            return -1  # no SUBACK within 5 s

    def ping(self):
        """PINGREQ; True when PINGRESP came back."""
        try:
            self.sock.sendall(b"\xc0\x00")
            while True:
                first, _ = self.read()
                if first >> 4 == 13:
                    return True
        except (OSError, IndexError):
            return False

    def close(self):
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


# --- CoAP helpers -----------------------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3
POST, CODE_2_01, CODE_2_04, CODE_2_05, CODE_4_03, CODE_4_04, CODE_5_03 = 2, 65, 68, 69, 131, 132, 163
OPT_OBSERVE, OPT_LOCATION_PATH, OPT_URI_PATH, OPT_CONTENT_FORMAT, OPT_URI_QUERY = 6, 8, 11, 12, 15


def code_str(code):
    return "none" if code is None else f"{code >> 5}.{code & 31:02d}"


def coap_encode(mtype, code, mid, token=b"", options=(), payload=b""):
    """A CoAP message (RFC 7252 §3): options as (number, bytes), sorted here."""

    def nibble(n):
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack("!H", n - 269)

    out = bytearray([0x40 | (mtype << 4) | len(token), code]) + struct.pack("!H", mid) + token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        (dn, dx), (ln, lx) = nibble(number - last), nibble(len(value))
        out += bytes([dn << 4 | ln]) + dx + lx + value
        last = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def coap_decode(data):
    """A dict (type, code, mid, token, options, payload), or None when not CoAP."""
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    tkl = data[0] & 15
    msg = {"type": (data[0] >> 4) & 3, "code": data[1], "mid": struct.unpack("!H", data[2:4])[0],
           "token": data[4:4 + tkl], "options": [], "payload": b""}
    i, number = 4 + tkl, 0
    while i < len(data):
        if data[i] == 0xFF:
            msg["payload"] = data[i + 1:]
            break
        delta, length = data[i] >> 4, data[i] & 15
        i += 1
        ext = []
        for v in (delta, length):
            if v == 13:
                ext.append(data[i] + 13)
                i += 1
            elif v == 14:
                ext.append(struct.unpack("!H", data[i:i + 2])[0] + 269)
                i += 2
            else:
                ext.append(v)
        number += ext[0]
        msg["options"].append((number, data[i:i + ext[1]]))
        i += ext[1]
    return msg


def uint_opt(n):
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class CoapPeer:
    """A UDP socket speaking CoAP to the server as a device would, answering the server's requests."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.mid = random.randrange(65536)
        self.seen = []  # messages that were not an answer we waited for

    def next_mid(self):
        self.mid = (self.mid + 1) % 65536
        return self.mid

    def recv(self, timeout):
        self.sock.settimeout(max(timeout, 0.01))
        try:
            data, _ = self.sock.recvfrom(65536)
        except (TimeoutError, socket.timeout):
            return None
        return coap_decode(data)

    def answer_server(self, m):
        """A request from the server (the observation of /19/0/0, a read): a piggybacked answer."""
        if any(n == OPT_OBSERVE for n, _ in m["options"]):
            opts = [(OPT_OBSERVE, b""), (OPT_CONTENT_FORMAT, uint_opt(42))]
            reply = coap_encode(ACK, CODE_2_05, m["mid"], m["token"], opts)
        else:
            reply = coap_encode(ACK, CODE_4_04, m["mid"], m["token"])
        self.sock.sendto(reply, COAP)

    def request(self, code, path, query=(), payload=b"", content_format=None, tries=4):
        """A confirmable request: the response message (piggybacked or separate), or None. 5.03 is retried."""
        for _ in range(6):
            mid, token = self.next_mid(), secrets.token_bytes(4)
            opts = [(OPT_URI_PATH, p.encode()) for p in path] + [(OPT_URI_QUERY, q.encode()) for q in query]
            if content_format is not None:
                opts.append((OPT_CONTENT_FORMAT, uint_opt(content_format)))
            packet = coap_encode(CON, code, mid, token, opts, payload)
            answer = self._exchange(packet, mid, token, tries)
            if answer is None or answer["code"] != CODE_5_03:
                return answer
            time.sleep(2)
        return answer

    def _exchange(self, packet, mid, token, tries):
        for attempt in range(tries):
            self.sock.sendto(packet, COAP)
            deadline = time.monotonic() + 2 * (attempt + 1)
            while (left := deadline - time.monotonic()) > 0:
                m = self.recv(left)
                if m is None:
                    continue
                if m["type"] == CON and 1 <= m["code"] <= 31:
                    self.answer_server(m)
                elif m["type"] == ACK and m["mid"] == mid and m["code"] != 0:
                    return m
                elif m["token"] == token and m["type"] in (CON, NON) and m["code"] >= 64:
                    if m["type"] == CON:
                        self.sock.sendto(coap_encode(ACK, 0, m["mid"]), COAP)
                    return m
                elif not (m["type"] == ACK and m["mid"] == mid):  # an empty ACK: a separate answer follows
                    self.seen.append(m)
        return None

    def pump(self, seconds):
        """Answers the server's requests for a while; returns what else arrived."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            m = self.recv(left)
            if m is None:
                continue
            if m["type"] == CON and 1 <= m["code"] <= 31:
                self.answer_server(m)
            else:
                got.append(m)
        return got


# --- server resources -------------------------------------------------------------------------------


class Monitor(threading.Thread):
    """Samples the server's open descriptors (and that it lives) every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.max_fds = 0
        self.alive = True
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.max_fds = max(self.max_fds, len(os.listdir(f"/proc/{SERVER_PID}/fd")))
            except OSError:
                self.alive = False
                return
            self.stop.wait(0.25)

    @staticmethod
    def status_kib(field):
        try:
            with open(f"/proc/{SERVER_PID}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None


# --- the checks -------------------------------------------------------------------------------------


def check_slowloris():
    """a. 50 TCP connections that never start TLS, 50 that finish the handshake and send nothing, 50 that
    trickle a request head one byte a second: each must be closed by the server within 20 s."""
    limit = 20.0
    results = collections.defaultdict(list)  # kind -> [(closed, seconds, how)]
    lock = threading.Lock()
    start = threading.Barrier(150)

    def wait_closed(sock, t0, trickle):
        next_byte = time.monotonic() + 1
        while True:
            now = time.monotonic()
            if now - t0 >= limit:
                return False, now - t0, "open"
            if trickle and now >= next_byte:
                try:
                    sock.send(b"a")
                except CLOSED + (OSError,):
                    return True, time.monotonic() - t0, "cut on send"
                next_byte += 1
            wake = min(t0 + limit, next_byte) if trickle else t0 + limit
            sock.settimeout(max(0.05, wake - time.monotonic()))
            try:
                data = sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except CLOSED + (ssl.SSLError, OSError):
                return True, time.monotonic() - t0, "reset"
            if not data:
                return True, time.monotonic() - t0, "eof"
            # An answer (408...) before the close: keep reading to the end.

    def client(kind):
        outcome = (False, 0.0, "not connected")
        sock = None
        try:
            start.wait(30)
            t0 = time.monotonic()
            sock = socket.create_connection(HTTPS, timeout=10)
            if kind != "raw":
                try:
                    sock = TLS.wrap_socket(sock, server_hostname="localhost")
                except CLOSED + (ssl.SSLError, OSError):
                    outcome = (True, time.monotonic() - t0, "handshake cut")
                    return
            if kind == "trickle":
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-a: ")
            outcome = wait_closed(sock, t0, kind == "trickle")
        except (OSError, threading.BrokenBarrierError) as e:
            outcome = (False, 0.0, f"error {e}")
        finally:
            if sock is not None:
                sock.close()
            with lock:
                results[kind].append(outcome)

    threads = [threading.Thread(target=client, args=(k,)) for k in ("raw", "tls-idle", "trickle") for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parts, passed = [], True
    for kind in ("raw", "tls-idle", "trickle"):
        rows = results[kind]
        closed = [s for c, s, _ in rows if c]
        passed &= len(closed) == 50 and max(closed, default=0) <= limit
        hows = collections.Counter(h for _, _, h in rows)
        slowest = f"slowest {max(closed):.1f} s" if closed else "none closed"
        parts.append(f"{kind} {len(closed)}/50 closed ({slowest}; "
                     + ", ".join(f"{h} {n}" for h, n in sorted(hows.items())) + ")")
    report("slowloris", passed, "; ".join(parts))


def login_form(username, password):
    return urllib.parse.urlencode({"username": username, "password": password, "next": "/"})


def sign_in(conn, username, password):
    """POST /auth/login on `conn`: `invalid`, `throttled`, `busy`, `failed`, `success`, `http NNN`..."""
    conn.request("POST", "/auth/login", body=login_form(username, password), headers={
        "Host": HOST_HEADER, "Origin": ORIGIN, "Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    location = r.getheader("Location") or ""
    if r.status != 303:
        return f"http {r.status}"
    if not location.startswith("/login"):
        return "success"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    return query.get("error", ["?"])[0]


def check_admin_guessing():
    """b(ii). 24 simultaneous wrong passwords for `admin` from 127.0.0.2: at most 5 answered `invalid`
    (the rest throttled or busy)."""
    n = 24
    outcomes, lock = collections.Counter(), threading.Lock()
    conns = []
    for _ in range(n):
        c = https("127.0.0.2", timeout=60)
        c.connect()
        conns.append(c)
    barrier = threading.Barrier(n)

    def attempt(c):
        try:
            barrier.wait(10)
            result = sign_in(c, ADMIN, "wrong-" + secrets.token_hex(6))
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as e:
            result = f"error {type(e).__name__}"
        with lock:
            outcomes[result] += 1
        c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=attempt, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    report("signin-admin-concurrent", outcomes["invalid"] <= 5 and outcomes["success"] == 0,
           f"{outcomes['invalid']} of {n} answered invalid (max 5); "
           + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + f"; {took:.1f} s")


def check_signin_flood():
    """b(i). 300 sign-ins with fresh random user names from 127.0.0.3, 30 at a time: at least 250 answered
    throttled or busy; meanwhile /healthz (from 127.0.0.1) keeps a median latency under 250 ms."""
    total, workers = 300, 30
    outcomes, lock = collections.Counter(), threading.Lock()
    remaining = iter(range(total))

    def worker():
        conn = None
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            result = None
            for _ in range(2):  # a kept-alive connection the server closed meanwhile: once more, afresh
                try:
                    if conn is None:
                        conn = https("127.0.0.3", timeout=60)
                    result = sign_in(conn, "probe-" + secrets.token_hex(6), secrets.token_hex(8))
                    break
                except (OSError, http.client.HTTPException) as e:
                    result = f"error {type(e).__name__}"
                    if conn is not None:
                        conn.close()
                    conn = None
            with lock:
                outcomes[result] += 1
        if conn is not None:
            conn.close()

    sampler = HealthSampler(0.1)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    samples = sampler.finish()
    latencies = [s if status == 200 else float("inf") for status, s in samples]
    median = statistics.median(latencies) if latencies else float("inf")
    refused = outcomes["throttled"] + outcomes["busy"]
    report("signin-flood", refused >= 250 and median < 0.25,
           f"{refused} of {total} throttled/busy (min 250); "
           + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
           + f"; {took:.1f} s; /healthz median {median * 1000:.0f} ms (max 250) over {len(samples)} samples,"
           f" max {max(latencies, default=0) * 1000:.0f} ms")


def check_mqtt_subscriptions():
    """c. Device `probe-sub` subscribes to its own uplink topic, to `#` below its prefix, then to 500
    distinct filters below its prefix (one per SUBSCRIBE): the first two refused (0x80), at most 16 of the
    500 granted and the rest refused 0x80."""
    device, secret = "probe-sub", os.environ["PROBE_SUB_SECRET"]
    client = Mqtt()
    rc = client.login(device, secret)
    if rc != 0:
        report("mqtt-subscriptions", False, f"login answered CONNACK {rc}")
        return
    reconnects = 0

    def subscribe(packet_id, topic):
        nonlocal client, reconnects
        code = client.subscribe(packet_id, topic)
        if code is None:  # closed: log in again and go on (the quota is the process's, not the session's)
            reconnects += 1
            client = Mqtt()
            if client.login(device, secret) != 0:
                return None
        return code

    up = subscribe(1, f"$oc/devices/{device}/sys/events/up")
    hash_all = subscribe(2, f"$oc/devices/{device}/#")
    codes = collections.Counter()
    for i in range(500):
        code = subscribe(3 + i, f"$oc/devices/{device}/x/{i}")
        codes["granted" if code in (0, 1) else "0x80" if code == 0x80 else f"other {code}"] += 1
    client.close()
    passed = up == 0x80 and hash_all == 0x80 and codes["granted"] <= 16 and codes["0x80"] == 500 - codes["granted"]
    report("mqtt-subscriptions", passed,
           f"sys/events/up -> {up if up is None else hex(up)}, # -> {hash_all if hash_all is None else hex(hash_all)}; "
           f"500 filters: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
           + f" (granted max 16); reconnects {reconnects}")


class UpdraftDevice(threading.Thread):
    """d. A device whose id is `updraft`: logged in at the start, kept connected (PINGREQ every 15 s)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rc = None
        self.alive = False
        self.error = ""
        self.stop = threading.Event()

    def run(self):
        try:
            client = Mqtt()
            self.rc = client.login("updraft", os.environ["PROBE_UPDRAFT_SECRET"])
            self.alive = self.rc == 0
            while self.alive and not self.stop.wait(15):
                self.alive = client.ping()
            if self.alive:
                self.alive = client.ping()
            client.close()
        except OSError as e:
            self.error = str(e)
            self.alive = False


def check_oversize_connect():
    """e(i). An MQTT CONNECT declaring 200 000 bytes (header and all the bytes sent): closed without
    CONNACK 0 within 5 s."""
    size = 200_000
    client_id, _ = iotda_login("probe-big", "0" * 16)
    start = mqtt_str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + mqtt_str(client_id)
    packet = b"\x10" + varint(size) + start + b"\x00" * (size - len(start))
    sock = socket.create_connection(MQTT, timeout=5)
    t0 = time.monotonic()
    sent, got, how = 0, b"", "open"
    try:
        while sent < len(packet):
            sent += sock.send(packet[sent:sent + 65536])
    except (TimeoutError, socket.timeout):
        pass  # the server stopped reading; whether it closes is seen below
    except CLOSED + (OSError,):
        how = "cut while sending"
    if how == "open":
        while (left := t0 + 5 - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except (TimeoutError, socket.timeout):
                break
            except CLOSED + (OSError,):
                how = "reset"
                break
            if not chunk:
                how = "eof"
                break
            got += chunk
    took = time.monotonic() - t0
    sock.close()
    connack0 = len(got) >= 4 and got[0] == 0x20 and got[3] == 0
    answered = f"CONNACK {got[3]}" if len(got) >= 4 and got[0] == 0x20 else f"{len(got)} bytes" if got else "nothing"
    report("mqtt-oversize-connect", how != "open" and took <= 5 and not connack0,
           f"{how} after {took:.2f} s (max 5) having sent {sent} of {len(packet)} bytes; answered {answered}")


def check_oversize_signed():
    """e(ii). POST /v5/.../batchtasks signed with an unknown AK and Content-Length: 16000000, head only:
    401 within 3 s (the body is not waited for)."""
    sock = tls_socket()
    head = (f"POST /v5/iot/{PROJECT}/batchtasks HTTP/1.1\r\nHost: {HOST_HEADER}\r\n"
            "Authorization: SDK-HMAC-SHA256 Access=NOSUCHKEY, SignedHeaders=host;x-sdk-date, Signature=00\r\n"
            f"X-Sdk-Date: {sdk_date()}\r\nContent-Type: application/json\r\nContent-Length: 16000000\r\n\r\n")
    t0 = time.monotonic()
    sock.sendall(head.encode())
    got, how = b"", "no answer"
    while b"\r\n" not in got and (left := t0 + 3 - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, socket.timeout):
            break
        except CLOSED + (OSError,):
            how = "reset"
            break
        if not chunk:
            how = "closed"
            break
        got += chunk
    took = time.monotonic() - t0
    sock.close()
    status = None
    if b"\r\n" in got:
        line = got.split(b"\r\n", 1)[0].decode(errors="replace")
        how = line
        parts = line.split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    report("api-oversize-unsigned", status == 401 and took <= 3, f"{how!r} after {took:.2f} s (want 401 within 3 s)")


def check_coap_flood():
    """f. 20 000 datagrams from one socket, as fast as possible: half garbage, half CON POST /rd?ep=<random>.
    Bytes received back (until 3 s after the last) at most the bytes sent; /healthz answers within 1 s
    during and after."""
    n = 20_000
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    received = {"bytes": 0, "datagrams": 0}
    stop = threading.Event()

    def receive():
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                continue
            received["bytes"] += len(data)
            received["datagrams"] += 1

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    sampler = HealthSampler(0.1)
    sampler.start()
    sent_bytes, send_errors = 0, 0
    mid = random.randrange(65536)
    t0 = time.monotonic()
    for i in range(n):
        if i % 2:
            mid = (mid + 1) % 65536
            ep = "probe-" + secrets.token_hex(6)
            data = coap_encode(CON, POST, mid, secrets.token_bytes(4),
                               [(OPT_URI_PATH, b"rd"), (OPT_URI_QUERY, f"ep={ep}".encode())])
        else:
            data = secrets.token_bytes(random.randint(1, 64))
        try:
            sent_bytes += sock.sendto(data, COAP)
        except OSError:
            send_errors += 1
    send_took = time.monotonic() - t0
    time.sleep(3)
    during = sampler.finish()
    stop.set()
    receiver.join()
    sock.close()
    after = [healthz() for _ in range(3)]

    def worst(samples):
        return max((s if status == 200 else float("inf") for status, s in samples), default=float("inf"))

    w_during, w_after = worst(during), worst(after)
    passed = received["bytes"] <= sent_bytes and w_during < 1 and w_after < 1
    report("coap-flood", passed,
           f"sent {sent_bytes} bytes in {n - send_errors} datagrams ({send_took:.2f} s, {send_errors} send errors), "
           f"received {received['bytes']} bytes in {received['datagrams']} datagrams (max the bytes sent); "
           f"/healthz worst {w_during * 1000:.0f} ms during ({len(during)} samples), {w_after * 1000:.0f} ms after (max 1000)")


def check_lwm2m_spoofing():
    """g. `probe-ep` (secure_access false) registers from socket A; from socket B, an update of A's
    registration gets 4.04 and a NON notification is not accepted (RST or nothing); A's own update still
    gets 2.04. A device with secure_access true registering over plain CoAP gets 4.03."""
    for node, secure in (("probe-ep", False), ("probe-ep-sec", True)):
        status, body = signed_api("POST", f"/v5/iot/{PROJECT}/devices", {
            "device_id": node, "node_id": node, "product_id": "probecoap", "device_name": node,
            "auth_info": {"auth_type": "SECRET", "secret": secrets.token_hex(16), "secure_access": secure}})
        if status != 201:
            report("lwm2m-spoofing", False, f"registering {node} over the API answered {status}: {str(body)[:200]}")
            return
    register = {"path": ["rd"], "payload": b"</3/0>,</5/0>,</19/0>", "content_format": 40}
    a, b, c = CoapPeer(), CoapPeer(), CoapPeer()
    reg = a.request(POST, query=["ep=probe-ep", "lt=300", "lwm2m=1.0"], **register)
    location = [v.decode(errors="replace") for n, v in (reg or {}).get("options", []) if n == OPT_LOCATION_PATH]
    if reg is None or reg["code"] != CODE_2_01 or len(location) != 2 or location[0] != "rd":
        report("lwm2m-spoofing", False, f"registration from A answered {code_str(reg and reg['code'])}, location {location}")
    else:
        reg_id = location[1]
        a.pump(0.5)  # the server observes /19/0/0 at A
        update_b = b.request(POST, ["rd", reg_id])
        # A notification from B, as if from the device: not A's observation, not from A's address.
        mid = b.next_mid()
        opts = [(OPT_OBSERVE, uint_opt(7)), (OPT_CONTENT_FORMAT, uint_opt(42))]
        b.sock.sendto(coap_encode(NON, CODE_2_05, mid, secrets.token_bytes(4), opts, b"\xff\xfe\x01\x13\x00\x00\x00\x00"), COAP)
        answers = b.pump(2) + b.seen
        rst = [m for m in answers if m["type"] == RST and m["mid"] == mid]
        others = [m for m in answers if not (m["type"] == RST and m["mid"] == mid)]
        notification = "rst" if rst and not others else "nothing" if not answers else f"{len(others)} other answers"
        update_a = a.request(POST, ["rd", reg_id])
        passed = (update_b is not None and update_b["code"] == CODE_4_04 and notification in ("rst", "nothing")
                  and update_a is not None and update_a["code"] == CODE_2_04)
        report("lwm2m-spoofing", passed,
               f"A registered rd/{reg_id}; update from B -> {code_str(update_b and update_b['code'])} (want 4.04); "
               f"NON notification from B -> {notification} (want rst or nothing); "
               f"update from A -> {code_str(update_a and update_a['code'])} (want 2.04)")
    sec = c.request(POST, query=["ep=probe-ep-sec", "lt=300", "lwm2m=1.0"], **register)
    report("lwm2m-secure-access", sec is not None and sec["code"] == CODE_4_03,
           f"plain CoAP registration of a secure_access device -> {code_str(sec and sec['code'])} (want 4.03)")
    for peer in (a, b, c):
        peer.sock.close()


def tally():
    """Subtask counts of the campaign's task by status."""
    db = sqlite3.connect(os.path.join(os.environ["UPDRAFT_DATA_DIR"], "updraft.db"), timeout=10)
    try:
        rows = db.execute("select status, count(*) from subtasks where task_id = ? group by status", (TASK,)).fetchall()
    finally:
        db.close()
    return collections.Counter({s: n for s, n in rows})


def check_campaign():
    """The campaign that ran meanwhile: every subtask terminal, all DEVICES succeeded (waits up to
    PROBE_CAMPAIGN_WAIT seconds from the task's creation)."""
    deadline = TASK_STARTED + CAMPAIGN_WAIT
    rows = collections.Counter()
    while True:
        try:
            rows = tally()
        except sqlite3.Error as e:
            log(f"tally: {e}")
        terminal = rows["Success"] + rows["Fail"] + rows["Stopped"]
        total = sum(rows.values())
        if (total == DEVICES and terminal == total) or time.time() >= deadline:
            break
        time.sleep(2)
    took = time.time() - TASK_STARTED
    report("campaign", total == DEVICES and terminal == total and rows["Success"] == DEVICES,
           f"{terminal} of {total} terminal, Success {rows['Success']} of {DEVICES} ("
           + " ".join(f"{k}={v}" for k, v in sorted(rows.items())) + f") {took:.0f} s after the task began")
    return rows["Success"] == DEVICES and terminal == total == DEVICES


# --- main -------------------------------------------------------------------------------------------


def run(name, check, *args):
    """Runs a check; an exception is that check's failure. Logs the server's memory and descriptors after
    it, so a peak can be traced to the check that caused it."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - a broken check must not hide the others
        report(name, False, f"probe error: {type(e).__name__}: {e}")
        return None
    finally:
        hwm, rss = Monitor.status_kib("VmHWM"), Monitor.status_kib("VmRSS")
        try:
            fds = len(os.listdir(f"/proc/{SERVER_PID}/fd"))
        except OSError:
            fds = None
        if hwm is not None and rss is not None:
            log(f"after {name}: server VmHWM {hwm / 1024:.0f} MiB, VmRSS {rss / 1024:.0f} MiB, {fds} descriptors")


def main():
    monitor = Monitor()
    monitor.start()
    updraft = UpdraftDevice()
    updraft.start()
    run("slowloris", check_slowloris)
    run("signin-admin-concurrent", check_admin_guessing)
    run("signin-flood", check_signin_flood)
    run("mqtt-subscriptions", check_mqtt_subscriptions)
    run("mqtt-oversize-connect", check_oversize_connect)
    run("api-oversize-unsigned", check_oversize_signed)
    run("coap-flood", check_coap_flood)
    run("lwm2m-spoofing", check_lwm2m_spoofing)
    completed = run("campaign", check_campaign)
    updraft.stop.set()
    updraft.join(30)
    report("mqtt-device-named-updraft", updraft.rc == 0 and updraft.alive and bool(completed),
           f"CONNACK {updraft.rc} (want 0), still connected at the end: {updraft.alive}"
           f"{' (' + updraft.error + ')' if updraft.error else ''}, campaign completed: {bool(completed)}")
    monitor.stop.set()
    monitor.join()
    hwm = Monitor.status_kib("VmHWM")
    report("server-alive", monitor.alive and hwm is not None, f"pid {SERVER_PID} running at the end")
    if hwm is not None:
        report("peak-rss", hwm * 1024 < GIB, f"VmHWM {hwm / 1024:.1f} MiB (max 1024)")

    print("[probe] summary", flush=True)
    width = max(len(n) for n, _, _ in RESULTS)
    for name, passed, numbers in RESULTS:
        print(f"  {name:<{width}}  {'PASS' if passed else 'FAIL'}  {numbers}")
    peak = f"{hwm / 1024:.1f} MiB" if hwm is not None else "unknown (server gone)"
    print(f"[probe] server peak RSS (VmHWM): {peak}; most open descriptors: {monitor.max_fds}", flush=True)
    failed = [n for n, p, _ in RESULTS if not p]
    print(f"[probe] {len(RESULTS) - len(failed)} of {len(RESULTS)} passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
