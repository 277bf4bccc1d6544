"""The leader-to-leader channel between two clusters: mutual TLS, authenticated frames, resume after a drop.

Layers, from the wire up:
  * TLS 1.2+ with client certificates required on both sides, verified against the federation's CA
    (certificates from tools/make_certs.py): nobody without a CA-signed certificate can talk to a leader.
  * Frames: a fixed header (magic, type, sequence number, acknowledgement, payload length), the payload, and
    an HMAC-SHA256 tag over header + payload under a per-session key. The receiver rejects and logs a frame
    whose tag does not verify (tampered), whose sequence number was already delivered (replayed), or that
    ends before its declared length (truncated). The tag protects the application stream across
    reconnections, which TLS (one record stream per connection) cannot.
  * Sessions: a sender keeps every frame until the peer acknowledges it. After a dropped link the client
    redials, both sides say which sequence number they expect next, and each retransmits what the other
    has not received, byte for byte; the message stream continues as if nothing happened.

Messages are a JSON header plus raw numpy buffers (never pickle: the peer is not trusted to run code here).
"""
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import ssl
import struct
import time

import numpy as np

from ppzoo.errors import ConfigError

log = logging.getLogger("ppzoo.nebula")

MAGIC = b"NBL1"
HEADER = struct.Struct("!4sBQQI")  # magic, frame type, sequence number, acknowledgement, payload length
TAG_BYTES = 32
FRAME_HELLO, FRAME_DATA = 1, 2
MAX_PAYLOAD_BYTES = 1 << 30


class LinkDropped(ConnectionError):
    """The TCP/TLS link failed (reset, closed, or a frame cut short); the channel redials and resumes."""


class ChannelClosed(ConnectionError):
    """The peer could not be reached again within the reconnect timeout."""


# ------------------------------------------------------------------------------------------- messages
def encode_message(meta, arrays=None):
    """A message: a JSON-able `meta` dict and named numpy arrays, as bytes."""
    arrays = arrays or {}
    index, blobs, offset = [], [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        index.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                      "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps({"meta": meta, "arrays": index}).encode("utf-8")
    return struct.pack("!I", len(head)) + head + b"".join(blobs)


def decode_message(payload):
    """(meta, {name: array}) of encode_message's bytes; malformed payloads raise ValueError."""
    if len(payload) < 4:
        raise ValueError("message shorter than its length prefix")
    (head_len,) = struct.unpack("!I", payload[:4])
    head = json.loads(payload[4:4 + head_len].decode("utf-8"))
    body = memoryview(payload)[4 + head_len:]
    arrays = {}
    for entry in head["arrays"]:
        dtype = np.dtype(entry["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are not accepted")
        end = entry["offset"] + entry["nbytes"]
        if end > len(body) or int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize != entry["nbytes"]:
            raise ValueError(f"array {entry['name']!r} does not fit the message")
        arrays[entry["name"]] = np.frombuffer(body[entry["offset"]:end], dtype=dtype).reshape(entry["shape"]).copy()
    return head["meta"], arrays


# --------------------------------------------------------------------------------------------- frames
class FrameCodec:
    """Seals and opens frames under one session key, tracking sequence numbers in both directions."""

    def __init__(self, key):
        self.key = key
        self.next_send = 1  # sequence number of the next data frame this side sends
        self.next_expected = 1  # sequence number of the next data frame this side accepts
        self.rejected = []  # (reason, sequence number) of every rejected frame, for inspection

    def seal(self, frame_type, seq, payload):
        header = HEADER.pack(MAGIC, frame_type, seq, self.next_expected, len(payload))
        return header + payload + hmac.new(self.key, header + payload, hashlib.sha256).digest()

    def seal_data(self, payload):
        frame = self.seal(FRAME_DATA, self.next_send, payload)
        self.next_send += 1
        return frame

    def verify(self, header, payload, tag):
        """(frame_type, seq, ack) if the frame is authentic and new; None (logged) if it is rejected."""
        magic, frame_type, seq, ack, _length = HEADER.unpack(header)
        if not hmac.compare_digest(tag, hmac.new(self.key, header + payload, hashlib.sha256).digest()):
            return self._reject("tampered (HMAC tag does not verify)", seq)
        if frame_type == FRAME_DATA:
            if seq < self.next_expected:
                return self._reject(f"replayed (already delivered; expecting {self.next_expected})", seq)
            if seq > self.next_expected:
                return self._reject(f"out of order (a gap; expecting {self.next_expected})", seq)
            self.next_expected += 1
        return frame_type, seq, ack

    def _reject(self, reason, seq):
        self.rejected.append((reason, seq))
        log.warning("nebula channel: rejected frame seq=%d: %s", seq, reason)
        return None


# --------------------------------------------------------------------------------------------- TLS
def tls_context(server_side, cert, key, ca_cert):
    """A context that presents `cert` and accepts only peers whose certificate `ca_cert` signed."""
    for what, path in (("cert", cert), ("key", key), ("ca_cert", ca_cert)):
        if not path or not os.path.isfile(path):
            raise ConfigError(
                f"Distributed.cross_cluster.{what}={path!r} is not a file. Make the federation's certificates "
                "with `python tools/make_certs.py --out certs --clusters a b` and point cert/key/ca_cert at them."
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca_cert)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual: the server demands the client's certificate too
    if not server_side:
        context.check_hostname = False  # peers are named by their certificate's CA signature, not DNS
    return context


def _parse_address(address):
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Distributed.cross_cluster.address={address!r} must be HOST:PORT, e.g. 10.0.0.2:7700.")
    return host, int(port)


# ------------------------------------------------------------------------------------------- channel
class SecureChannel:
    """A message channel to the other cluster's leader (`role` server listens, client dials).

    send(meta, arrays), recv() -> (meta, arrays) and exchange() (send and receive at once) survive dropped
    links: on failure the channel reconnects (the client redials with backoff, the server accepts again) and
    resumes the session. Counters: bytes_sent / bytes_received (frame bytes on the wire), reconnects,
    codec.rejected.

    One thread uses a channel at a time. Its socket is non-blocking and every write also drains what the
    peer sends (into a buffer): two leaders that each send a large message first cannot deadlock, and the
    TLS connection is never read and written by two threads at once (OpenSSL does not allow it).
    """

    def __init__(self, role, address, cert, key, ca_cert, reconnect_timeout=60.0, io_timeout=300.0):
        if role not in ("server", "client"):
            raise ConfigError(f"Distributed.cross_cluster.role={role!r}: use server (listens) or client (dials).")
        self.role = role
        self.host, self.port = _parse_address(address)
        self.context = tls_context(role == "server", cert, key, ca_cert)
        self.reconnect_timeout = reconnect_timeout
        self.io_timeout = io_timeout
        self.listener = None
        self.sock = None
        self.inbuf = bytearray()  # bytes received and not yet taken as a frame
        self.codec = None
        self.session_id = None
        self.unacked = {}  # seq -> sealed frame, kept until the peer acknowledges it
        self.bytes_sent = self.bytes_received = 0
        self.reconnects = 0

    # ---------------------------------------------------------------------------------- connection
    def listen(self):
        """Server: bind the listening socket now (port 0 picks a free one); returns the port."""
        if self.listener is None:
            self.listener = socket.create_server((self.host, self.port))
            self.port = self.listener.getsockname()[1]
        return self.port

    def connect(self):
        """Connect (or reconnect) and run the session handshake; returns self."""
        if self.role == "server":
            self.listen()
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                self._open(deadline)
                self._handshake()
                return self
            except (OSError, ssl.SSLError, LinkDropped) as error:
                self._close_socket()
                if isinstance(error, ssl.SSLCertVerificationError):
                    raise  # the peer's certificate is not the federation's: retrying cannot help, and must not
                if time.monotonic() > deadline:
                    raise ChannelClosed(f"could not (re)connect to the peer leader at {self.host}:{self.port} "
                                        f"within {self.reconnect_timeout:.0f}s: {error}") from error
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _open(self, deadline):
        if self.role == "server":
            while True:
                self.listener.settimeout(max(0.1, deadline - time.monotonic()))
                raw, peer = self.listener.accept()
                raw.settimeout(min(self.io_timeout, max(0.1, deadline - time.monotonic())))
                try:
                    self.sock = self.context.wrap_socket(raw, server_side=True)
                    break
                except ssl.SSLError as error:
                    # Someone without a federation certificate: refuse them and keep waiting for the peer.
                    log.warning("nebula channel: refused %s:%d: %s", peer[0], peer[1], error)
                    raw.close()
                    if time.monotonic() > deadline:
                        raise
        else:
            raw = socket.create_connection((self.host, self.port), timeout=max(0.1, deadline - time.monotonic()))
            raw.settimeout(min(self.io_timeout, max(0.1, deadline - time.monotonic())))
            self.sock = self.context.wrap_socket(raw, server_hostname=None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.inbuf = bytearray()  # a frame cut short on the old link is gone; the peer retransmits it

    def _handshake(self):
        """Agree on the session (new: a key from both sides' nonces; resumed: the old key) and retransmit
        whatever the peer has not received. Hello frames ride inside mutually authenticated TLS."""
        nonce = os.urandom(32)
        resume = self.codec is not None
        hello = {"session": self.session_id, "nonce": nonce.hex(),
                 "next_expected": self.codec.next_expected if resume else 1}
        opener = self.codec if resume else FrameCodec(b"\0" * 32)
        self._io(opener.seal(FRAME_HELLO, 0, json.dumps(hello).encode()))
        header, payload, tag = self._io(b"", want_frame=True)
        if opener.verify(header, payload, tag) is None:
            raise LinkDropped("the peer's hello did not verify")
        peer = json.loads(payload)
        if resume:
            if peer["session"] != self.session_id:
                raise ChannelClosed("the peer leader restarted (a new session): the run cannot resume across it")
        else:
            nonces = sorted([nonce, bytes.fromhex(peer["nonce"])])
            self.session_id = hashlib.sha256(b"session" + nonces[0] + nonces[1]).hexdigest()[:16]
            self.codec = FrameCodec(hashlib.sha256(b"nebula-i key" + nonces[0] + nonces[1]).digest())
        self._acknowledged(peer["next_expected"])
        if resume:
            self.reconnects += 1
            log.warning("nebula channel: link resumed (reconnect %d); retransmitting %d frame(s)", self.reconnects,
                        len(self.unacked))
        self._io(b"".join(self.unacked[seq] for seq in sorted(self.unacked)))

    def _acknowledged(self, next_expected):
        for seq in [s for s in self.unacked if s < next_expected]:
            del self.unacked[seq]

    # ------------------------------------------------------------------------------------ raw I/O
    def _io(self, out=b"", want_frame=False):
        """Write `out` completely while reading whatever arrives; with want_frame, also wait for one whole
        frame and return it as (header, payload, tag). Raises LinkDropped when the link fails or stalls."""
        sock = self.sock
        if sock is None:
            raise LinkDropped("no link")
        view, sent = memoryview(out), 0
        idle_deadline = time.monotonic() + self.io_timeout
        while True:
            frame = self._take_frame() if want_frame else None
            if sent >= len(view) and (frame is not None or not want_frame):
                return frame
            progressed = False
            if sent < len(view):
                try:
                    n = sock.send(view[sent:sent + (1 << 16)])
                    sent += n
                    self.bytes_sent += n
                    progressed = n > 0
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
                except (OSError, ssl.SSLError) as error:
                    raise self._dropped(f"send failed: {error}") from error
            while True:  # drain everything readable, so the peer's writes never stall on ours
                try:
                    chunk = sock.recv(1 << 16)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except (OSError, ssl.SSLError) as error:
                    raise self._dropped(f"link failed: {error}") from error
                if not chunk:
                    raise self._dropped("link closed")
                self.inbuf += chunk
                progressed = True
            if progressed:
                idle_deadline = time.monotonic() + self.io_timeout
                continue
            if time.monotonic() > idle_deadline:
                raise self._dropped(f"no progress for {self.io_timeout:.0f}s")
            select.select([sock], [sock] if sent < len(view) else [], [], 0.5)

    def _take_frame(self):
        """The next whole frame from the receive buffer, or None if it has not all arrived yet."""
        if len(self.inbuf) < HEADER.size:
            return None
        magic, _type, _seq, _ack, length = HEADER.unpack(bytes(self.inbuf[:HEADER.size]))
        if magic != MAGIC or length > MAX_PAYLOAD_BYTES:
            self.inbuf = bytearray()
            raise self._dropped(f"garbage on the link (magic {magic!r}, length {length}); resynchronizing")
        end = HEADER.size + length + TAG_BYTES
        if len(self.inbuf) < end:
            return None
        frame = bytes(self.inbuf[:end])
        del self.inbuf[:end]
        self.bytes_received += end
        return frame[:HEADER.size], frame[HEADER.size:HEADER.size + length], frame[HEADER.size + length:]

    def _dropped(self, reason):
        """LinkDropped for `reason`; a frame that had begun to arrive is logged as truncated."""
        if len(self.inbuf) >= HEADER.size:
            magic, _type, seq, _ack, length = HEADER.unpack(bytes(self.inbuf[:HEADER.size]))
            if magic == MAGIC:
                log.warning("nebula channel: rejected frame seq=%d: truncated (%d of %d bytes arrived: %s)", seq,
                            len(self.inbuf), HEADER.size + length + TAG_BYTES, reason)
        elif self.inbuf:
            log.warning("nebula channel: rejected a frame: truncated (%d header bytes arrived: %s)", len(self.inbuf),
                        reason)
        self.inbuf = bytearray()
        return LinkDropped(reason)

    def _close_socket(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _recover(self, error):
        log.warning("nebula channel: link dropped (%s); reconnecting", error)
        self._close_socket()
        self.connect()

    # ------------------------------------------------------------------------------------- traffic
    def _seal(self, meta, arrays):
        frame = self.codec.seal_data(encode_message(meta, arrays))
        self.unacked[self.codec.next_send - 1] = frame
        return frame

    def send(self, meta, arrays=None):
        frame = self._seal(meta, arrays)
        try:
            self._io(frame)
        except LinkDropped as error:
            self._recover(error)  # the resume handshake retransmits this frame

    def recv(self):
        while True:
            try:
                header, payload, tag = self._io(b"", want_frame=True)
            except LinkDropped as error:
                self._recover(error)
                continue
            verified = self.codec.verify(header, payload, tag)
            if verified is None:
                continue  # rejected and logged; the stream's framing is intact, read on
            frame_type, _seq, ack = verified
            self._acknowledged(ack)
            if frame_type == FRAME_DATA:
                try:
                    return decode_message(payload)
                except (ValueError, KeyError, UnicodeDecodeError) as error:
                    # Authentic but malformed: the peer is broken, not the link. Say so loudly.
                    raise ChannelClosed(f"the peer sent a malformed message: {error}") from error

    def exchange(self, meta, arrays=None):
        """Send a message and receive the peer's, both at once (full duplex); returns the peer's (meta, arrays)."""
        self.send(meta, arrays)  # drains the peer's message into the buffer while writing ours
        return self.recv()

    def inject(self, raw):
        """Write raw bytes on the link, bypassing framing (tests and fault drills: forged or replayed frames)."""
        self._io(raw)

    def drop_link(self):
        """Cut the current connection (tests and fault drills): the next send/recv reconnects."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._close_socket()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
