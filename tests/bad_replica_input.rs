//! Bad input against a real replica daemon's protocol port (DESIGN.md
//! invariant 8): malformed frames, refused requests and path tricks, an
//! absurd generation, a second writer beside a live engine, two engines
//! started at once, and garbage sent while an engine does IO. After each,
//! the daemon still runs and serves a fresh connection, other connections
//! keep working, and every volume holds exactly the bytes written before.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::{Rng, RngCore, SeedableRng};
use shorthorn_proto::frame::decode_frame;
use shorthorn_proto::{
    ErrorCode, Generation, Hello, Member, MemberState, Membership, RemoteError, Reply, Request,
    VolumeInfo, MAGIC, MAX_BODY_LEN, MAX_IO_LEN, PROTOCOL_VERSION,
};

use common::bad_input::*;
use common::*;

// ----- a hand-driven replica-protocol client -------------------------------

/// What the daemon did after we sent something.
#[derive(Debug)]
enum Answer {
    Reply(u64, Reply),
    Closed,
    /// Nothing within [`STEP`].
    Silent,
}

/// One raw TCP connection to a replica daemon.
struct Wire {
    s: TcpStream,
    buf: BytesMut,
}

impl Wire {
    fn connect(addr: &str) -> Wire {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(STEP)).unwrap();
        s.set_write_timeout(Some(STEP)).unwrap();
        s.set_nodelay(true).unwrap();
        Wire {
            s,
            buf: BytesMut::new(),
        }
    }

    /// A connection that said hello and was welcomed.
    fn session(addr: &str, volume: &str, generation: u64) -> Wire {
        let mut w = Wire::connect(addr);
        match w.hello(volume, generation) {
            Reply::Welcome(_) => w,
            other => panic!("hello for {volume:?} at g{generation} refused: {other:?}"),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the replica daemon");
    }

    /// Sends bytes the daemon may already have hung up on.
    fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn next(&mut self) -> Answer {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match decode_frame(&mut self.buf) {
                Ok(Some(raw)) => {
                    let reply = Reply::decode(&raw)
                        .unwrap_or_else(|e| panic!("the daemon sent an undecodable reply: {e}"));
                    return Answer::Reply(raw.id, reply);
                }
                Ok(None) => {}
                Err(e) => panic!("the daemon sent a bad frame: {e}"),
            }
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    assert!(self.buf.is_empty(), "the daemon hung up inside a frame");
                    return Answer::Closed;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Answer::Silent
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Answer::Closed
                }
                Err(e) => panic!("reading from the daemon: {e}"),
            }
        }
    }

    fn hello(&mut self, volume: &str, generation: u64) -> Reply {
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "bad_replica_input test".into(),
            volume: volume.into(),
            generation: Generation(generation),
        });
        self.call(1, &hello)
    }

    /// Sends a request and returns its reply, checking the echoed id.
    fn call(&mut self, id: u64, request: &Request) -> Reply {
        self.send(&request.encode(id).to_vec());
        match self.next() {
            Answer::Reply(got, reply) => {
                assert_eq!(got, id, "reply to {request:?} has the wrong id");
                reply
            }
            other => panic!("no reply to {}: {other:?}", request.name()),
        }
    }

    /// The next thing must be an error reply with `code`.
    fn refused(&mut self, code: ErrorCode, what: &str) -> RemoteError {
        match self.next() {
            Answer::Reply(_, Reply::Error(e)) => {
                assert_eq!(e.code, code, "{what}: wrong error code in {e}");
                assert!(!e.message.is_empty(), "{what}: error without a message");
                e
            }
            other => panic!("{what}: expected a {code:?} error, got {other:?}"),
        }
    }

    /// The connection must end (EOF or reset) with nothing more sent.
    fn closes(&mut self, what: &str) {
        match self.next() {
            Answer::Closed => {}
            other => panic!("{what}: expected the connection to close, got {other:?}"),
        }
    }

    /// An error with `code` then a close, or a close at once: the daemon may
    /// hang up before our bytes are all read, and the reset can overtake its
    /// answer.
    fn refused_or_closed(&mut self, code: ErrorCode, what: &str) {
        match self.next() {
            Answer::Closed => {}
            Answer::Reply(_, Reply::Error(e)) => {
                assert_eq!(e.code, code, "{what}: wrong error code in {e}");
                self.closes(what);
            }
            other => panic!("{what}: expected a {code:?} error or a close, got {other:?}"),
        }
    }

    /// An error reply to a request on an open session that stays open.
    fn call_refused(&mut self, id: u64, request: &Request, code: ErrorCode, what: &str) {
        match self.call(id, request) {
            Reply::Error(e) => assert_eq!(e.code, code, "{what}: wrong error code in {e}"),
            other => panic!("{what}: expected a {code:?} error, got {other:?}"),
        }
        // The session is still in step.
        assert_eq!(
            self.call(id + 1000, &Request::Ping),
            Reply::Pong,
            "{what}: session broken"
        );
    }
}

/// A frame of any kind with a correct checksum.
fn raw_frame(version: u8, kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + body.len());
    v.extend_from_slice(&MAGIC);
    v.push(version);
    v.push(kind);
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(body);
    reseal(v)
}

/// Recomputes the checksum after a header field was changed.
fn reseal(mut frame: Vec<u8>) -> Vec<u8> {
    let sum = crc32(frame[..20].iter().chain(&frame[24..]));
    frame[20..24].copy_from_slice(&sum.to_le_bytes());
    frame
}

/// CRC-32 (IEEE), as crc32fast computes it; bitwise, since test frames are
/// small and the test should not share the product's checksum code.
fn crc32<'a>(bytes: impl Iterator<Item = &'a u8>) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn write_req(offset: u64, len: usize) -> Request {
    Request::Write {
        offset,
        fua: false,
        data: Bytes::from(vec![0xee; len]),
    }
}

fn volume_info(addr: &str, name: &str) -> VolumeInfo {
    let mut w = Wire::session(addr, "", 0);
    match w.call(
        2,
        &Request::GetVolume {
            name: name.to_string(),
        },
    ) {
        Reply::Volume(v) => v,
        other => panic!("get {name}: {other:?}"),
    }
}

/// The daemon is alive and answers a fresh connection: ping, and a listing
/// that still holds every volume.
fn assert_replica_serves(r: &mut Replica, volumes: &[(&str, u64)], after: &str) {
    assert!(
        r.proc.is_running(),
        "replica daemon died after {after}:\n{}",
        r.proc.log_text()
    );
    let mut w = Wire::session(&r.addr, "", 0);
    assert_eq!(w.call(7, &Request::Ping), Reply::Pong, "after {after}");
    let Reply::Volumes(list) = w.call(8, &Request::ListVolumes) else {
        panic!("no volume list after {after}");
    };
    for (name, size) in volumes {
        assert!(
            list.iter().any(|v| v.name == *name && v.size == *size),
            "after {after}: volume {name} missing from {list:?}"
        );
    }
}

/// Writes `src` over the volume through an engine, then stops it.
fn fill_volume(tmp: &Path, name: &str, replicas: &[&Replica], src: &Path) {
    let mut engine = Engine::start(tmp, name, replicas);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(engine.uri()));
    stop(&mut engine);
}

/// The volumes of [`replica_with_kept_and_other`], with their sizes.
const KEPT_AND_OTHER: [(&str, u64); 2] = [("kept", 16 << 20), ("other", 8 << 20)];

/// A replica daemon serving `tmp`/r1 with two volumes, each filled with
/// random bytes of its own: "kept" (from `seed`), which the bad input aims
/// at, and "other" (from `seed + 1000`), which it must not reach either.
/// Returns the daemon and the files of kept's and other's bytes.
fn replica_with_kept_and_other(tmp: &Path, seed: u64) -> (Replica, PathBuf, PathBuf) {
    let r = Replica::start(&tmp.join("r1"), "auto");
    create_volume("kept", "16MiB", &[&r]);
    create_volume("other", "8MiB", &[&r]);
    let src = tmp.join("src.img");
    random_file(&src, 16 * MIB, seed);
    fill_volume(tmp, "kept", &[&r], &src);
    let other_src = tmp.join("other-src.img");
    random_file(&other_src, 8 * MIB, seed + 1000);
    fill_volume(tmp, "other", &[&r], &other_src);
    (r, src, other_src)
}

/// Neither volume of [`replica_with_kept_and_other`] changed a byte.
fn assert_kept_and_other_hold(tmp: &Path, r: &Replica, kept: &Path, other: &Path) {
    assert_volume_holds(tmp, "kept", &[r], kept);
    assert_volume_holds(tmp, "other", &[r], other);
}

// ----- the daemon's protocol port -----------------------------------------

/// Malformed frames: each gets an error answer (or a close) on its own
/// connection and nothing else.
#[test]
fn replica_daemon_refuses_malformed_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut r, src, other_src) = replica_with_kept_and_other(tmp.path(), 81);
    let vols = KEPT_AND_OTHER;
    let addr = r.addr.clone();
    let ping = Request::Ping.encode(5).to_vec();
    assert_eq!(reseal(ping.clone()), ping, "the test's crc32 disagrees");

    // Random bytes from the first byte on.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for round in 0..10 {
        let mut junk = vec![0u8; rng.gen_range(1..8192)];
        rng.fill_bytes(&mut junk);
        if junk.starts_with(b"S") {
            junk[0] = b'X';
        }
        let mut w = Wire::connect(&addr);
        w.send_lossy(&junk);
        w.refused_or_closed(ErrorCode::BadFrame, &format!("garbage round {round}"));
    }
    assert_replica_serves(&mut r, &vols, "random garbage");

    // A web browser or a port scanner.
    let mut w = Wire::connect(&addr);
    w.send(b"GET / HTTP/1.1\r\nHost: replica\r\n\r\n");
    let e = w.refused(ErrorCode::BadFrame, "HTTP request");
    assert!(e.message.contains("magic"), "unclear answer to HTTP: {e}");
    w.closes("HTTP request");
    assert_replica_serves(&mut r, &vols, "an HTTP request");

    // A whole header with the wrong magic (checksum made right).
    let mut frame = ping.clone();
    frame[..4].copy_from_slice(b"SHRQ");
    let mut w = Wire::connect(&addr);
    w.send(&reseal(frame));
    w.refused(ErrorCode::BadFrame, "wrong magic");
    w.closes("wrong magic");
    assert_replica_serves(&mut r, &vols, "a wrong magic");

    // Another protocol version, before and after the handshake.
    for version in [0u8, 2, 0xff] {
        let mut frame = ping.clone();
        frame[4] = version;
        let mut w = Wire::connect(&addr);
        w.send(&reseal(frame.clone()));
        let e = w.refused(ErrorCode::VersionMismatch, "wrong version");
        assert!(
            e.message.contains(&version.to_string()),
            "the answer does not name version {version}: {e}"
        );
        w.closes("wrong version");
        let mut w = Wire::session(&addr, "", 0);
        w.send(&reseal(frame));
        w.refused(ErrorCode::VersionMismatch, "wrong version mid-session");
        w.closes("wrong version mid-session");
    }
    // A Hello frame of our version that claims another one inside.
    let mut w = Wire::connect(&addr);
    let mut hello = Request::Hello(Hello {
        version: 7,
        client: "from the future".into(),
        volume: String::new(),
        generation: Generation(0),
    })
    .encode(1)
    .to_vec();
    hello = reseal(hello);
    w.send(&hello);
    w.refused(ErrorCode::VersionMismatch, "hello of version 7");
    w.closes("hello of version 7");
    assert_replica_serves(&mut r, &vols, "wrong versions");

    // Absurd body lengths are refused at once, without waiting for the body.
    for len in [u32::MAX, MAX_BODY_LEN + 1] {
        for session in [false, true] {
            let mut frame = ping.clone();
            frame[16..20].copy_from_slice(&len.to_le_bytes());
            let mut w = if session {
                Wire::session(&addr, "kept", 0)
            } else {
                Wire::connect(&addr)
            };
            let started = Instant::now();
            w.send(&reseal(frame));
            let e = w.refused(ErrorCode::BadFrame, "absurd body length");
            assert!(e.message.contains("exceeds"), "unclear: {e}");
            w.closes("absurd body length");
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }
    assert_replica_serves(&mut r, &vols, "absurd lengths");

    // A frame cut short, then the client hangs up (before and after hello).
    for session in [false, true] {
        let mut w = if session {
            Wire::session(&addr, "", 0)
        } else {
            Wire::connect(&addr)
        };
        let frame = Request::ListVolumes.encode(3).to_vec();
        w.send(&frame[..13]);
        w.s.shutdown(Shutdown::Write).unwrap();
        w.refused_or_closed(ErrorCode::BadFrame, "truncated frame");
    }
    assert_replica_serves(&mut r, &vols, "truncated frames");

    // A flipped bit: refused by checksum, with the frame's id echoed.
    let mut frame = Request::ListVolumes.encode(77).to_vec();
    frame[21] ^= 0x10;
    let mut w = Wire::session(&addr, "", 0);
    w.send(&frame);
    match w.next() {
        Answer::Reply(77, Reply::Error(e)) => assert_eq!(e.code, ErrorCode::Checksum, "{e}"),
        other => panic!("bad checksum: expected a Checksum error for id 77, got {other:?}"),
    }
    w.closes("bad checksum");
    let mut frame = Request::Ping.encode(1).to_vec();
    frame[9] ^= 1;
    let mut w = Wire::connect(&addr);
    w.send(&frame);
    w.refused(ErrorCode::Checksum, "bad checksum on the first frame");
    w.closes("bad checksum on the first frame");
    assert_replica_serves(&mut r, &vols, "bad checksums");

    // Message kinds nobody defined, and replies sent as requests.
    for kind in [0x00u8, 0x7e, 0x83, 0xfe] {
        let mut w = Wire::connect(&addr);
        w.send(&raw_frame(PROTOCOL_VERSION, kind, 9, b"??"));
        w.refused(ErrorCode::Unsupported, &format!("kind {kind:#x} first"));
        w.closes("unknown kind first");
        let mut w = Wire::session(&addr, "", 0);
        w.send(&raw_frame(PROTOCOL_VERSION, kind, 9, b"??"));
        match w.next() {
            Answer::Reply(9, Reply::Error(e)) => assert_eq!(e.code, ErrorCode::Unsupported),
            other => panic!("kind {kind:#x}: expected Unsupported for id 9, got {other:?}"),
        }
        w.closes("unknown kind");
    }
    // Known kinds with bodies that do not parse: too short, trailing bytes,
    // a string longer than the body, a name that is not UTF-8.
    let mut bad_name = vec![3, 0];
    bad_name.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    for (kind, body) in [
        (0x10u8, vec![1, 2, 3]),
        (0x02, vec![0]),
        (0x23, vec![0xff, 0xff, b'a']),
        (0x23, bad_name),
    ] {
        let mut w = Wire::session(&addr, "", 0);
        w.send(&raw_frame(PROTOCOL_VERSION, kind, 4, &body));
        w.refused(ErrorCode::BadFrame, &format!("malformed kind {kind:#x}"));
        w.closes("malformed body");
    }
    let mut w = Wire::connect(&addr);
    w.send(&raw_frame(PROTOCOL_VERSION, 0x01, 1, &[1, 5, 0]));
    w.refused(ErrorCode::BadFrame, "malformed hello");
    w.closes("malformed hello");
    assert_replica_serves(&mut r, &vols, "unknown and malformed messages");

    // A client that connects and says nothing does not hold anyone up.
    let idle = Wire::connect(&addr);
    assert_replica_serves(&mut r, &vols, "an idle connection");
    drop(idle);

    assert_kept_and_other_hold(tmp.path(), &r, &src, &other_src);
    assert_replica_serves(&mut r, &vols, "everything");
}

/// Well-formed requests that must be refused: IO out of range, IO without
/// the right session, unknown volumes, stale generations, path tricks. None
/// of them changes a byte.
#[test]
fn replica_daemon_refuses_bad_requests_without_changing_a_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut r, src, other_src) = replica_with_kept_and_other(tmp.path(), 82);
    let vols = KEPT_AND_OTHER;
    let addr = r.addr.clone();
    let size = 16u64 << 20;
    let engine_gen = volume_info(&addr, "kept").generation.0;
    assert!(engine_gen >= 1, "the engine did not raise the generation");

    // IO before any hello.
    for request in [
        write_req(0, 4096),
        Request::Read {
            offset: 0,
            len: 4096,
        },
        Request::Flush,
    ] {
        let mut w = Wire::connect(&addr);
        w.send(&request.encode(1).to_vec());
        w.refused(ErrorCode::NotBound, "IO before hello");
        w.closes("IO before hello");
    }
    assert_replica_serves(&mut r, &vols, "IO before hello");

    // IO on an admin session, and changes on a look-only (generation 0)
    // session; a look-only session may read (checkers compare replicas so).
    for volume in ["", "kept"] {
        let mut w = Wire::session(&addr, volume, 0);
        let read = Request::Read {
            offset: 0,
            len: 4096,
        };
        if volume.is_empty() {
            w.call_refused(9, &read, ErrorCode::NotBound, "read on an admin session");
        } else {
            match w.call(9, &read) {
                Reply::Data(d) => assert_eq!(d.len(), 4096),
                other => panic!("a look-only read should succeed, got {other:?}"),
            }
        }
        for (i, request) in [
            write_req(0, 4096),
            Request::Trim {
                offset: 0,
                len: 4096,
            },
            Request::WriteZeroes {
                offset: 0,
                len: 4096,
                fua: true,
            },
            Request::Flush,
        ]
        .iter()
        .enumerate()
        {
            w.call_refused(
                10 + i as u64,
                request,
                ErrorCode::NotBound,
                &format!("{} on session {volume:?} g0", request.name()),
            );
        }
        w.call_refused(
            20,
            &Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "again".into(),
                volume: "kept".into(),
                generation: Generation(engine_gen + 5),
            }),
            ErrorCode::Invalid,
            "a second hello",
        );
    }
    assert_eq!(
        volume_info(&addr, "kept").generation.0,
        engine_gen,
        "a refused second hello changed the generation"
    );

    // A session that may write (like a newer engine), asking for what it
    // must not get. Refused requests leave the session open.
    let g = engine_gen + 1;
    let mut w = Wire::session(&addr, "kept", g);
    let cases: Vec<(Request, ErrorCode)> = vec![
        (write_req(size, 4096), ErrorCode::OutOfRange),
        (write_req(size - 4096, 8192), ErrorCode::OutOfRange),
        (write_req(u64::MAX - 4095, 8192), ErrorCode::OutOfRange),
        (write_req(u64::MAX, 1), ErrorCode::OutOfRange),
        (
            Request::Read {
                offset: size,
                len: 4096,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::Read {
                offset: u64::MAX - 100,
                len: 4096,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::Read {
                offset: 0,
                len: MAX_IO_LEN + 1,
            },
            ErrorCode::Invalid,
        ),
        (
            Request::Read {
                offset: 0,
                len: u32::MAX,
            },
            ErrorCode::Invalid,
        ),
        (
            Request::Trim {
                offset: size - 4096,
                len: 8192,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::Trim {
                offset: 4096,
                len: u64::MAX,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::WriteZeroes {
                offset: size - 4096,
                len: 8192,
                fua: false,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::WriteZeroes {
                offset: u64::MAX - 4095,
                len: 8192,
                fua: true,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Request::WriteZeroes {
                offset: 0,
                len: u64::MAX,
                fua: false,
            },
            ErrorCode::OutOfRange,
        ),
    ];
    for (i, (request, code)) in cases.iter().enumerate() {
        w.call_refused(100 + i as u64, request, *code, &format!("case {request:?}"));
    }
    // Management calls with bad names on the same session.
    for (i, name) in ["../kept", "", "a/b", ".."].iter().enumerate() {
        w.call_refused(
            200 + i as u64,
            &Request::GetVolume {
                name: name.to_string(),
            },
            ErrorCode::InvalidName,
            &format!("get {name:?}"),
        );
        w.call_refused(
            210 + i as u64,
            &Request::DeleteVolume {
                name: name.to_string(),
            },
            ErrorCode::InvalidName,
            &format!("delete {name:?}"),
        );
    }
    w.call_refused(
        220,
        &Request::DeleteVolume {
            name: "nosuch".into(),
        },
        ErrorCode::NotFound,
        "delete of an unknown volume",
    );
    // A bad checksum on a write: refused, never written, connection closed.
    let mut frame = write_req(0, 4096).encode(300).to_vec();
    frame[100] ^= 1;
    w.send(&frame);
    match w.next() {
        Answer::Reply(300, Reply::Error(e)) => assert_eq!(e.code, ErrorCode::Checksum, "{e}"),
        other => panic!("corrupted write: expected a Checksum error, got {other:?}"),
    }
    w.closes("corrupted write");
    // A write cut short, then a hang-up.
    let mut w = Wire::session(&addr, "kept", g);
    let frame = write_req(8192, 65536).encode(1).to_vec();
    w.send(&frame[..frame.len() / 2]);
    w.s.shutdown(Shutdown::Write).unwrap();
    w.refused_or_closed(ErrorCode::BadFrame, "half a write");
    assert_replica_serves(&mut r, &vols, "refused IO");

    // A session whose generation a newer one overtook can no longer write.
    let mut old = Wire::session(&addr, "kept", g);
    let _newer = Wire::session(&addr, "kept", g + 1);
    old.call_refused(
        400,
        &write_req(0, 4096),
        ErrorCode::StaleGeneration,
        "write from an overtaken session",
    );
    old.call_refused(
        401,
        &Request::WriteZeroes {
            offset: 0,
            len: 1 << 20,
            fua: false,
        },
        ErrorCode::StaleGeneration,
        "zeroes from an overtaken session",
    );

    // A hello with a stale generation (the first engine's), and with any
    // lower one: refused, and the generation stays.
    for stale in [engine_gen, g] {
        let mut w = Wire::connect(&addr);
        match w.hello("kept", stale) {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::StaleGeneration, "{e}"),
            other => panic!("stale hello at g{stale} accepted: {other:?}"),
        }
        w.closes("stale hello");
    }
    assert_eq!(volume_info(&addr, "kept").generation.0, g + 1);

    // Hellos for volumes that do not exist or cannot exist.
    let before = tree(tmp.path());
    for (name, code) in [
        ("nosuch", ErrorCode::NotFound),
        ("../kept", ErrorCode::InvalidName),
        ("../r1/volumes/kept", ErrorCode::InvalidName),
        ("a/b", ErrorCode::InvalidName),
        ("..", ErrorCode::InvalidName),
        (".", ErrorCode::InvalidName),
        ("/etc", ErrorCode::InvalidName),
        ("kept\0", ErrorCode::InvalidName),
        ("a b", ErrorCode::InvalidName),
    ] {
        for generation in [0, g + 10] {
            let mut w = Wire::connect(&addr);
            match w.hello(name, generation) {
                Reply::Error(e) => assert_eq!(e.code, code, "hello {name:?}: {e}"),
                other => panic!("hello for {name:?} accepted: {other:?}"),
            }
            w.closes("refused hello");
        }
    }
    let long = "x".repeat(5000);
    let mut w = Wire::connect(&addr);
    match w.hello(&long, 1) {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::InvalidName, "{e}"),
        other => panic!("hello for a 5000-character name accepted: {other:?}"),
    }

    // Path tricks in CreateVolume: refused, and nothing appears anywhere.
    let outside = std::env::temp_dir().join(format!("shorthorn-escape-{}", std::process::id()));
    let mut w = Wire::session(&addr, "", 0);
    let escape = outside.display().to_string();
    for (i, name) in [
        "../x",
        "../../x",
        "a/b",
        "..",
        ".",
        "",
        ".hidden",
        escape.as_str(),
        "x\0y",
        "a b",
        "ok\n",
        long.as_str(),
    ]
    .iter()
    .enumerate()
    {
        w.call_refused(
            500 + i as u64,
            &Request::CreateVolume {
                name: name.to_string(),
                size: 1 << 20,
            },
            ErrorCode::InvalidName,
            &format!("create {name:?}"),
        );
    }
    // Sizes the daemon cannot keep.
    for (i, bad) in [0u64, 1000, u64::MAX, (1 << 60) + 4096].iter().enumerate() {
        w.call_refused(
            600 + i as u64,
            &Request::CreateVolume {
                name: "sized".into(),
                size: *bad,
            },
            ErrorCode::Invalid,
            &format!("create of {bad} bytes"),
        );
    }
    // The same name with another size.
    w.call_refused(
        700,
        &Request::CreateVolume {
            name: "kept".into(),
            size: 32 << 20,
        },
        ErrorCode::AlreadyExists,
        "create kept again with another size",
    );
    assert_eq!(
        tree(tmp.path()),
        before,
        "a refused request left files behind"
    );
    assert!(!outside.exists(), "{} was created", outside.display());
    assert_replica_serves(&mut r, &vols, "bad names");

    assert_kept_and_other_hold(tmp.path(), &r, &src, &other_src);
    assert_replica_serves(&mut r, &vols, "everything");
}

/// A replica keeps a huge generation it is handed: the volume must still
/// accept a new engine afterwards (no engine may be locked out for good).
#[test]
fn replica_daemon_absurd_generation_does_not_lock_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("gen", "8MiB", &[&r]);
    let src = tmp.path().join("src.img");
    random_file(&src, 8 * MIB, 83);
    fill_volume(tmp.path(), "gen", &[&r], &src);

    let mut w = Wire::connect(&r.addr);
    let answer = w.hello("gen", u64::MAX);
    drop(w);
    eprintln!("hello at g=u64::MAX answered {answer:?}");
    assert_replica_serves(&mut r, &[("gen", 8 << 20)], "a hello at g=u64::MAX");
    // Refused or kept, a new engine must still be able to serve the volume.
    assert_volume_holds(tmp.path(), "gen", &[&r], &src);
}

/// A second client that says hello at the generation a live engine holds
/// must not be able to write beside it (invariant 4: two engines for one
/// volume never both write).
#[test]
fn replica_daemon_refuses_a_second_writer_at_the_engines_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("shared", "8MiB", &[&r]);
    let src = tmp.path().join("src.img");
    random_file(&src, 8 * MIB, 85);
    let mut engine = Engine::start(tmp.path(), "shared", &[&r]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(engine.uri()));
    let g = volume_info(&r.addr, "shared").generation.0;

    let mut w = Wire::connect(&r.addr);
    let wrote = match w.hello("shared", g) {
        Reply::Welcome(_) => w.call(2, &write_req(0, 4096)),
        refused => refused,
    };
    assert!(
        matches!(wrote, Reply::Error(_)),
        "a second client at the engine's generation g{g} wrote beside it: {wrote:?}"
    );
    let back = tmp.path().join("back.img");
    run(Command::new("nbdcopy").arg(engine.uri()).arg(&back));
    assert!(
        files_equal(&src, &back),
        "the volume changed under the engine"
    );
    stop(&mut engine);
}

/// A session replaced by a newer one (an engine that reconnected, or a
/// newer engine) can change nothing: not the data, not who is up to date,
/// not the dirty map. Calls already on their way when the newer session
/// opened are exactly what this guards against.
#[test]
fn a_replaced_session_can_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("moved", "8MiB", &[&r]);
    // The same client at the same generation twice: a reconnect.
    let mut old = Wire::session(&r.addr, "moved", 1);
    let mut new = Wire::session(&r.addr, "moved", 1);
    let id = match new.call(2, &Request::GetState) {
        Reply::State(s) => s.replica_id,
        other => panic!("state: {other:?}"),
    };
    let membership = |epoch| {
        Request::SetMembership(Membership {
            epoch,
            members: vec![Member {
                id: id.clone(),
                addr: r.addr.clone(),
                state: MemberState::Healthy,
            }],
        })
    };
    let dirty_before = match new.call(3, &write_req(0, 4096)) {
        Reply::Done => match new.call(4, &Request::GetState) {
            Reply::State(s) => s.dirty,
            other => panic!("state: {other:?}"),
        },
        other => panic!("the newer session's write: {other:?}"),
    };
    for (what, request) in [
        ("membership", membership(1)),
        ("write", write_req(8192, 4096)),
        (
            "clean",
            Request::MarkClean {
                bitmap: Bytes::from(vec![0xff; 1]),
            },
        ),
    ] {
        match old.call(5, &request) {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::StaleGeneration, "{what}: {e}"),
            other => panic!("the replaced session's {what} was taken: {other:?}"),
        }
    }
    match new.call(6, &Request::GetState) {
        Reply::State(s) => {
            assert_eq!(s.membership.epoch, 0, "membership changed");
            assert_eq!(s.dirty, dirty_before, "dirty map changed");
        }
        other => panic!("state: {other:?}"),
    }
    // The newer session still can.
    assert!(matches!(new.call(7, &membership(1)), Reply::Done));
}

/// An engine process started by hand, without waiting for it.
fn spawn_engine(dir: &Path, volume: &str, replica: &Replica, tag: &str) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{volume}-{tag}.sock"));
    let proc = Proc::spawn(
        &format!("engine {volume} {tag}"),
        Command::new(BIN)
            .args([
                "engine",
                "serve",
                volume,
                "--replica",
                &replica.addr,
                "--nbd",
            ])
            .arg(format!("unix:{}", socket.display()))
            .arg("--run-dir")
            .arg(dir),
        dir.join(format!("engine-{volume}-{tag}.log")),
    );
    (proc, socket)
}

/// Two engines for one volume started at the same moment (a retried attach,
/// a node that came back): at most one of them may write.
#[test]
fn two_engines_started_at_once_never_both_write() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("twice", "8MiB", &[&r]);
    // A race: a few rounds make a double attach all but certain to show.
    for round in 0..5 {
        let (mut a, sock_a) = spawn_engine(tmp.path(), "twice", &r, &format!("a{round}"));
        let (mut b, sock_b) = spawn_engine(tmp.path(), "twice", &r, &format!("b{round}"));
        // Each one either serves or gives up.
        wait_until("both engines to settle", STEP * 2, || {
            [(&mut a, &sock_a), (&mut b, &sock_b)]
                .into_iter()
                .all(|(p, s)| !p.is_running() || UnixStream::connect(s).is_ok())
        });
        let mut writers = Vec::new();
        let mut seen = String::new();
        for (name, p, sock, pattern) in [("a", &mut a, &sock_a, 0x11), ("b", &mut b, &sock_b, 0x22)]
        {
            if !p.is_running() {
                seen += &format!("engine {name} gave up:\n{}\n", p.log_text());
                continue;
            }
            let uri = format!("nbd+unix:///?socket={}", sock.display());
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {pattern:#x} 0 4k"),
                    "-c",
                    "flush",
                ])
                .arg(&uri)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() && said.contains("wrote 4096/4096") && !said.contains("error") {
                writers.push(name);
            }
            seen += &format!(
                "engine {name} serves; qemu-io said:\n{said}\nits log:\n{}\n",
                p.log_text()
            );
        }
        assert!(
            writers.len() < 2,
            "round {round}: engines {writers:?} both wrote the volume (generation g{})\n{seen}",
            volume_info(&r.addr, "twice").generation.0
        );
        // And the volume is not left with no writer at all: one of the two
        // serves it.
        assert_eq!(
            writers.len(),
            1,
            "round {round}: neither engine could write (generation g{})\n{seen}",
            volume_info(&r.addr, "twice").generation.0
        );
    }
}

/// An engine keeps doing verified IO through a replica daemon while other
/// connections to that daemon send garbage, stale hellos and refused IO.
#[test]
fn replica_daemon_keeps_serving_an_engine_during_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("busy", "32MiB", &[&r]);
    // A first engine raises the generation, so a lower one exists.
    let mut first = Engine::start(tmp.path(), "busy", &[&r]);
    stop(&mut first);
    let mut engine = Engine::start(tmp.path(), "busy", &[&r]);
    let engine_gen = volume_info(&r.addr, "busy").generation.0;
    assert!(engine_gen >= 2);

    let stopping = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let spam = {
        let addr = r.addr.clone();
        let stopping = stopping.clone();
        let rounds = rounds.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            while !stopping.load(Ordering::Relaxed) {
                // Junk from the first byte.
                let mut junk = vec![0u8; rng.gen_range(1..4096)];
                rng.fill_bytes(&mut junk);
                junk[0] = b'G';
                let mut w = Wire::connect(&addr);
                w.send_lossy(&junk);
                w.refused_or_closed(ErrorCode::BadFrame, "junk");
                // A stale engine trying to come back.
                let mut w = Wire::connect(&addr);
                match w.hello("busy", engine_gen - 1) {
                    Reply::Error(e) => assert_eq!(e.code, ErrorCode::StaleGeneration),
                    other => panic!("stale hello accepted during IO: {other:?}"),
                }
                // A looker writing.
                let mut w = Wire::session(&addr, "busy", 0);
                w.call_refused(3, &write_req(0, 4096), ErrorCode::NotBound, "look write");
                // Junk after a good hello on the busy volume.
                let mut junk = vec![0u8; rng.gen_range(24..4096)];
                rng.fill_bytes(&mut junk);
                w.send_lossy(&junk);
                w.refused_or_closed(ErrorCode::BadFrame, "junk mid-session");
                // IO before hello.
                let mut w = Wire::connect(&addr);
                w.send(&write_req(0, 4096).encode(1).to_vec());
                w.refused(ErrorCode::NotBound, "IO before hello");
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // fio writes with checksums, then reads everything back and verifies.
    let started = Instant::now();
    let fio = Command::new("fio")
        .args([
            "--name=busy",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=24M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--loops=2",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={}", engine.uri()))
        .current_dir(tmp.path())
        .output()
        .expect("run fio");
    // Keep the garbage going for at least a few rounds.
    while rounds.load(Ordering::Relaxed) < 20 && started.elapsed() < STEP * 2 {
        std::thread::sleep(Duration::from_millis(20));
    }
    stopping.store(true, Ordering::Relaxed);
    let spam_result = spam.join();
    assert!(
        fio.status.success(),
        "fio failed while garbage was sent:\n{}\n{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    assert!(spam_result.is_ok(), "the garbage sender failed (see above)");
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(rounds >= 20, "only {rounds} garbage rounds");
    assert!(engine.proc.is_running(), "engine died");
    let log = engine.proc.log_text();
    assert!(
        !log.contains("dropped from the healthy set"),
        "the engine lost its replica:\n{log}"
    );
    assert_replica_serves(&mut r, &[("busy", 32 << 20)], "garbage during IO");
    stop(&mut engine);
    eprintln!(
        "{rounds} garbage rounds during {:.1} s of fio",
        started.elapsed().as_secs_f64()
    );
}
