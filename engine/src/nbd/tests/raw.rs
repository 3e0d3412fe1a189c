//! Raw bytes against a real server: protocol corners and bad input. Every
//! test checks that the server still serves a fresh connection afterwards
//! and, where it matters, that the backend was not called or changed.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{config, init_tracing, Hold, Kind, MemBackend, TestServer};
use crate::nbd::proto::{self, RequestHeader};
use crate::nbd::{serve, NbdListen, NbdServer, NbdServerConfig, HANDSHAKE_TIMEOUT};

const SIZE: usize = 1 << 20;
const STEP: Duration = Duration::from_secs(5);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A hand-driven NBD client.
struct Raw {
    s: Box<dyn Stream>,
}

impl Raw {
    async fn connect(listen: &NbdListen) -> Raw {
        let s: Box<dyn Stream> = match listen {
            NbdListen::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.unwrap()),
            NbdListen::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await.unwrap()),
        };
        Raw { s }
    }

    /// Connects and reads the greeting; checks its bytes.
    async fn greeted(listen: &NbdListen) -> Raw {
        let mut c = Raw::connect(listen).await;
        let mut g = [0u8; proto::GREETING_LEN];
        c.read_exact(&mut g).await;
        assert_eq!(g, proto::greeting());
        c
    }

    /// Greeted, fixed newstyle, ready for options.
    async fn haggling(listen: &NbdListen) -> Raw {
        let mut c = Raw::greeted(listen).await;
        c.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
        c
    }

    /// In transmission on the default export via NBD_OPT_GO.
    async fn attached(listen: &NbdListen) -> Raw {
        let mut c = Raw::haggling(listen).await;
        let replies = c.option(proto::OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(replies.last().unwrap().0, proto::REP_ACK);
        c
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(STEP, self.s.write_all(bytes))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// Sends bytes the server may already have hung up on.
    async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(STEP, self.s.write_all(bytes)).await;
    }

    async fn read_exact(&mut self, buf: &mut [u8]) {
        tokio::time::timeout(STEP, self.s.read_exact(buf))
            .await
            .expect("read timed out")
            .expect("read failed");
    }

    /// Sends an option; returns its replies up to the final one.
    async fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = BytesMut::new();
        out.put_u64(proto::OPTION_MAGIC);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
        self.send(&out).await;
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.read_exact(&mut h).await;
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                proto::OPTION_REPLY_MAGIC
            );
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            self.read_exact(&mut data).await;
            replies.push((ty, data));
            if ty != proto::REP_INFO && ty != proto::REP_SERVER {
                return replies;
            }
        }
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: proto::REQUEST_MAGIC,
            flags,
            command,
            handle,
            offset,
            len,
        };
        self.send(&h.encode()).await;
    }

    /// Reads one simple reply header: (error, handle).
    async fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; proto::SIMPLE_REPLY_LEN];
        self.read_exact(&mut r).await;
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            proto::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    async fn read_block(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(proto::CMD_READ, 0, handle, offset, len).await;
        assert_eq!(self.reply().await, (0, handle));
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data).await;
        data
    }

    /// The server closes the connection (EOF or reset) without sending more.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(STEP, self.s.read(&mut buf)).await {
            Err(_) => panic!("connection still open"),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("expected close, got {n} bytes: {:?}", &buf[..n]),
        }
    }
}

fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A fresh client can attach and read the expected bytes.
async fn assert_serves(server: &TestServer, backend: &MemBackend) {
    let mut c = Raw::attached(&server.listen).await;
    let got = c.read_block(99, 4096, 512).await;
    assert_eq!(got, backend.snapshot()[4096..4608]);
    c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_info_list_and_export_name_negotiate() {
    for kind in [Kind::Unix, Kind::Tcp] {
        let backend = MemBackend::patterned(SIZE);
        let server = TestServer::start(kind, &backend, config("vol")).await;
        let mut c = Raw::haggling(&server.listen).await;

        let list = c.option(proto::OPT_LIST, &[]).await;
        assert_eq!(
            list[0],
            (proto::REP_SERVER, vec![0, 0, 0, 3, b'v', b'o', b'l'])
        );
        assert_eq!(list[1].0, proto::REP_ACK);

        let info = c
            .option(
                proto::OPT_INFO,
                &info_data(
                    b"vol",
                    &[
                        proto::INFO_BLOCK_SIZE,
                        proto::INFO_NAME,
                        proto::INFO_DESCRIPTION,
                    ],
                ),
            )
            .await;
        let flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES;
        assert!(info.contains(&(
            proto::REP_INFO,
            proto::info_export(SIZE as u64, flags).to_vec()
        )));
        assert!(info.contains(&(proto::REP_INFO, proto::info_block_size().to_vec())));
        assert!(info.contains(&(proto::REP_INFO, proto::info_string(proto::INFO_NAME, "vol"))));
        assert_eq!(info.last().unwrap().0, proto::REP_ACK);

        assert_eq!(
            c.option(proto::OPT_STRUCTURED_REPLY, &[]).await[0].0,
            proto::REP_ERR_UNSUP
        );
        assert_eq!(
            c.option(proto::OPT_GO, &info_data(b"other", &[])).await[0].0,
            proto::REP_ERR_UNKNOWN
        );
        assert_eq!(
            c.option(0x1234, b"whatever").await[0].0,
            proto::REP_ERR_UNSUP
        );
        assert_eq!(
            c.option(proto::OPT_GO, b"\0\0").await[0].0,
            proto::REP_ERR_INVALID
        );
        assert_eq!(
            c.option(proto::OPT_LIST, b"x").await[0].0,
            proto::REP_ERR_INVALID
        );
        let go = c.option(proto::OPT_GO, &info_data(b"vol", &[])).await;
        assert_eq!(go.last().unwrap().0, proto::REP_ACK);
        assert_eq!(c.read_block(1, 0, 512).await, backend.snapshot()[..512]);

        // The old way in, with and without the 124 zero bytes.
        for (client_flags, padding) in [
            (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES, 0),
            (proto::FLAG_C_FIXED_NEWSTYLE, 124),
            (0, 124),
        ] {
            let mut c = Raw::greeted(&server.listen).await;
            c.send(&client_flags.to_be_bytes()).await;
            let mut opt = BytesMut::new();
            opt.put_u64(proto::OPTION_MAGIC);
            opt.put_u32(proto::OPT_EXPORT_NAME);
            opt.put_u32(3);
            opt.put_slice(b"vol");
            c.send(&opt).await;
            let mut reply = vec![0u8; 10 + padding];
            c.read_exact(&mut reply).await;
            assert_eq!(
                u64::from_be_bytes(reply[0..8].try_into().unwrap()),
                SIZE as u64
            );
            assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), flags);
            assert!(reply[10..].iter().all(|b| *b == 0));
            assert_eq!(
                c.read_block(2, 512, 512).await,
                backend.snapshot()[512..1024]
            );
        }

        let mut c = Raw::haggling(&server.listen).await;
        assert_eq!(
            c.option(proto::OPT_ABORT, &[]).await,
            vec![(proto::REP_ACK, vec![])]
        );
        c.expect_closed().await;
        assert_serves(&server, &backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_is_advertised_only_when_configured() {
    let backend = MemBackend::new(SIZE);
    for multi_conn in [false, true] {
        let cfg = NbdServerConfig {
            multi_conn,
            ..config("vol")
        };
        let server = TestServer::start(Kind::Tcp, &backend, cfg).await;
        let mut c = Raw::haggling(&server.listen).await;
        let go = c.option(proto::OPT_GO, &info_data(b"", &[])).await;
        let export = go
            .iter()
            .find(|(ty, d)| *ty == proto::REP_INFO && d[0..2] == [0, 0])
            .unwrap();
        let flags = u16::from_be_bytes([export.1[10], export.1[11]]);
        assert_eq!(flags & proto::TFLAG_CAN_MULTI_CONN != 0, multi_conn);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_garbage_closes_and_server_keeps_serving() {
    for kind in [Kind::Unix, Kind::Tcp] {
        let backend = MemBackend::patterned(SIZE);
        let before = backend.snapshot();
        let server = TestServer::start_default(kind, &backend).await;

        // Garbage instead of client flags (unknown flag bits).
        let mut c = Raw::greeted(&server.listen).await;
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        c.expect_closed().await;

        // Valid flags, then an option with the wrong magic.
        let mut c = Raw::haggling(&server.listen).await;
        c.send(&[0xde; 16]).await;
        c.expect_closed().await;

        // An absurd option length: closed without reading 4 GiB.
        let mut c = Raw::haggling(&server.listen).await;
        let mut opt = BytesMut::new();
        opt.put_u64(proto::OPTION_MAGIC);
        opt.put_u32(proto::OPT_GO);
        opt.put_u32(u32::MAX);
        c.send(&opt).await;
        c.expect_closed().await;

        // NBD_OPT_EXPORT_NAME cannot be refused politely: unknown name closes.
        let mut c = Raw::haggling(&server.listen).await;
        let mut opt = BytesMut::new();
        opt.put_u64(proto::OPTION_MAGIC);
        opt.put_u32(proto::OPT_EXPORT_NAME);
        opt.put_u32(4);
        opt.put_slice(b"nope");
        c.send(&opt).await;
        c.expect_closed().await;

        // A header cut short, then hang up.
        let mut c = Raw::haggling(&server.listen).await;
        c.send(&proto::OPTION_MAGIC.to_be_bytes()[..5]).await;
        drop(c);

        // Random bytes of random lengths from the first byte on.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            let mut c = Raw::greeted(&server.listen).await;
            let mut junk = vec![0u8; rng.gen_range(1..300)];
            rng.fill_bytes(&mut junk);
            c.send_lossy(&junk).await;
            drop(c);
        }

        assert_serves(&server, &backend).await;
        assert_eq!(backend.snapshot(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_without_touching_the_backend() {
    for kind in [Kind::Unix, Kind::Tcp] {
        let backend = MemBackend::patterned(SIZE);
        let before = backend.snapshot();
        let server = TestServer::start_default(kind, &backend).await;
        let mut c = Raw::attached(&server.listen).await;
        let size = SIZE as u64;
        let too_long = proto::MAX_BLOCK_SIZE + 512;

        let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
            // (command, flags, offset, len, expected error)
            (proto::CMD_READ, 0, size, 512, proto::EINVAL),
            (proto::CMD_READ, 0, size - 512, 1024, proto::EINVAL),
            (proto::CMD_READ, 0, u64::MAX - 511, 1024, proto::EINVAL),
            (proto::CMD_READ, 0, 0, too_long, proto::EINVAL),
            (proto::CMD_READ, 0, 1, 512, proto::EINVAL),
            (proto::CMD_READ, 0, 0, 100, proto::EINVAL),
            (proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512, proto::EINVAL),
            (proto::CMD_READ, 0x8000, 0, 512, proto::EINVAL),
            (proto::CMD_TRIM, 0, size, 512, proto::EINVAL),
            (proto::CMD_TRIM, 0, 3, 512, proto::EINVAL),
            (proto::CMD_WRITE_ZEROES, 0, size - 512, 1024, proto::ENOSPC),
            (
                proto::CMD_WRITE_ZEROES,
                0,
                u64::MAX - 511,
                1024,
                proto::ENOSPC,
            ),
            (
                proto::CMD_WRITE_ZEROES,
                proto::CMD_FLAG_FAST_ZERO,
                0,
                512,
                proto::EINVAL,
            ),
            (proto::CMD_CACHE, 0, 0, 512, proto::EINVAL),
            (proto::CMD_BLOCK_STATUS, 0, 0, 512, proto::EINVAL),
            (9, 0, 0, 512, proto::EINVAL),
            (0xffff, 0, 0, 0, proto::EINVAL),
        ];
        for (i, (command, flags, offset, len, want)) in cases.iter().enumerate() {
            c.request(*command, *flags, i as u64, *offset, *len).await;
            assert_eq!(
                c.reply().await,
                (*want, i as u64),
                "case {i}: {command} {offset} {len}"
            );
        }

        // Writes carry their payload; refused ones must still consume it.
        let writes: Vec<(u16, u64, u32, u32)> = vec![
            (0, size, 512, proto::ENOSPC),
            (0, size - 512, 1024, proto::ENOSPC),
            (0, u64::MAX - 511, 1024, proto::ENOSPC),
            (0, 100, 512, proto::EINVAL),
            (proto::CMD_FLAG_NO_HOLE, 0, 512, proto::EINVAL),
            (0, 0, too_long, proto::EINVAL),
        ];
        for (i, (flags, offset, len, want)) in writes.iter().enumerate() {
            let handle = 1000 + i as u64;
            c.request(proto::CMD_WRITE, *flags, handle, *offset, *len)
                .await;
            c.send(&vec![0xee; *len as usize]).await;
            assert_eq!(c.reply().await, (*want, handle), "write case {i}");
        }

        // Zero-length requests succeed without a backend call.
        for command in [
            proto::CMD_READ,
            proto::CMD_WRITE,
            proto::CMD_TRIM,
            proto::CMD_WRITE_ZEROES,
        ] {
            c.request(command, 0, 7, 0, 0).await;
            assert_eq!(c.reply().await, (0, 7));
        }
        assert_eq!(backend.calls(), 0, "a refused request reached the backend");

        // The connection is still in step.
        assert_eq!(c.read_block(5, 0, 512).await, before[..512]);
        assert_eq!(backend.snapshot(), before);
        assert_serves(&server, &backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_only_that_connection() {
    for kind in [Kind::Unix, Kind::Tcp] {
        let backend = MemBackend::patterned(SIZE);
        let before = backend.snapshot();
        let server = TestServer::start_default(kind, &backend).await;
        // A bystander connection that must survive everything below.
        let mut bystander = Raw::attached(&server.listen).await;

        // Wrong request magic.
        let mut c = Raw::attached(&server.listen).await;
        let mut h = RequestHeader {
            magic: 0x1234_5678,
            flags: 0,
            command: proto::CMD_READ,
            handle: 1,
            offset: 0,
            len: 512,
        };
        c.send(&h.encode()).await;
        c.expect_closed().await;

        // A write too long even to discard.
        let mut c = Raw::attached(&server.listen).await;
        h.magic = proto::REQUEST_MAGIC;
        h.command = proto::CMD_WRITE;
        h.len = u32::MAX;
        c.send(&h.encode()).await;
        c.send_lossy(&[0xee; 4096]).await;
        c.expect_closed().await;

        // Truncated header, then hang up.
        let mut c = Raw::attached(&server.listen).await;
        c.send(&h.encode()[..10]).await;
        drop(c);

        // A write whose payload stops half way, then hang up.
        let mut c = Raw::attached(&server.listen).await;
        c.request(proto::CMD_WRITE, 0, 3, 0, 4096).await;
        c.send(&[0xee; 100]).await;
        drop(c);

        // Random bytes after a good handshake.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20 {
            let mut c = Raw::attached(&server.listen).await;
            let mut junk = vec![0u8; rng.gen_range(1..200)];
            rng.fill_bytes(&mut junk);
            c.send_lossy(&junk).await;
            drop(c);
        }

        assert_eq!(bystander.read_block(1, 8192, 512).await, before[8192..8704]);
        assert_serves(&server, &backend).await;
        assert_eq!(backend.snapshot(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_and_replies_may_overtake_each_other() {
    let backend = MemBackend::new(SIZE);
    let server = TestServer::start_default(Kind::Tcp, &backend).await;
    let mut c = Raw::attached(&server.listen).await;

    c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 4096, 1024)
        .await;
    c.send(&[0xab; 1024]).await;
    assert_eq!(c.reply().await, (0, 1));
    c.request(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_NO_HOLE,
        2,
        4096,
        512,
    )
    .await;
    assert_eq!(c.reply().await, (0, 2));
    c.request(proto::CMD_FLUSH, 0, 3, 0, 0).await;
    assert_eq!(c.reply().await, (0, 3));
    assert_eq!(backend.flushes(), 1);
    let data = backend.snapshot();
    assert!(data[4096..4608].iter().all(|b| *b == 0));
    assert!(data[4608..5120].iter().all(|b| *b == 0xab));

    // A read held in the backend does not hold back the one behind it.
    backend.set_hold(Hold::ReadsAt(0));
    c.request(proto::CMD_READ, 0, 10, 0, 512).await;
    c.request(proto::CMD_READ, 0, 11, 4608, 512).await;
    assert_eq!(c.reply().await, (0, 11));
    let mut payload = vec![0u8; 512];
    c.read_exact(&mut payload).await;
    assert!(payload.iter().all(|b| *b == 0xab));
    backend.release(1);
    assert_eq!(c.reply().await, (0, 10));
    c.read_exact(&mut payload).await;
    assert!(payload.iter().all(|b| *b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded_per_connection() {
    let backend = MemBackend::new(SIZE);
    let server = TestServer::start_default(Kind::Unix, &backend).await;
    backend.set_hold(Hold::Everything);
    let mut c = Raw::attached(&server.listen).await;
    let total = crate::nbd::MAX_INFLIGHT_REQUESTS as u64 + 50;
    let mut pipelined = BytesMut::new();
    for handle in 0..total {
        let h = RequestHeader {
            magic: proto::REQUEST_MAGIC,
            flags: 0,
            command: proto::CMD_READ,
            handle,
            offset: 0,
            len: 512,
        };
        pipelined.put_slice(&h.encode());
    }
    c.send(&pipelined).await;

    let deadline = tokio::time::Instant::now() + STEP;
    while backend.calls() < crate::nbd::MAX_INFLIGHT_REQUESTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} calls",
            backend.calls()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.calls(), crate::nbd::MAX_INFLIGHT_REQUESTS);

    backend.release(total as usize);
    let mut seen = vec![false; total as usize];
    for _ in 0..total {
        let (err, handle) = c.reply().await;
        assert_eq!(err, 0);
        let mut payload = vec![0u8; 512];
        c.read_exact(&mut payload).await;
        assert!(!std::mem::replace(&mut seen[handle as usize], true));
    }
    assert_eq!(backend.calls(), total as usize);
    assert!(backend.max_inflight() <= crate::nbd::MAX_INFLIGHT_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_answers_in_flight_requests_first() {
    let backend = MemBackend::patterned(SIZE);
    let server = TestServer::start_default(Kind::Unix, &backend).await;
    backend.set_hold(Hold::ReadsAt(0));
    let mut c = Raw::attached(&server.listen).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    c.request(proto::CMD_DISC, 0, 2, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    backend.release(1);
    assert_eq!(c.reply().await, (0, 1));
    let mut payload = vec![0u8; 512];
    c.read_exact(&mut payload).await;
    assert_eq!(payload, backend.snapshot()[..512]);
    c.expect_closed().await;

    // A client that vanishes with a request in flight harms nobody.
    let mut c = Raw::attached(&server.listen).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(c);
    backend.release(1);
    backend.set_hold(Hold::Nothing);
    assert_serves(&server, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    let backend = MemBackend::patterned(SIZE);
    let cfg = NbdServerConfig {
        max_connections: 1,
        ..config("vol")
    };
    let server = TestServer::start(Kind::Tcp, &backend, cfg).await;
    let mut first = Raw::attached(&server.listen).await;
    // The second is told why (libnbd and qemu show the message), then
    // closed when it gives up.
    let mut second = Raw::haggling(&server.listen).await;
    let go = second.option(proto::OPT_GO, &info_data(b"", &[])).await;
    assert_eq!(go.len(), 1);
    assert_eq!(go[0].0, proto::REP_ERR_POLICY);
    let why = String::from_utf8_lossy(&go[0].1);
    assert!(
        why.contains("too many connections") && why.contains("--max-connections"),
        "{why}"
    );
    let abort = second.option(proto::OPT_ABORT, &[]).await;
    assert_eq!(abort[0].0, proto::REP_ACK);
    second.expect_closed().await;
    assert_eq!(first.read_block(1, 0, 512).await, backend.snapshot()[..512]);
    first.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    first.expect_closed().await;

    // The slot frees once the first connection's task has ended.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut c = Raw::haggling(&server.listen).await;
        let go = c.option(proto::OPT_GO, &info_data(b"", &[])).await;
        if go.last().unwrap().0 == proto::REP_ACK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_then_removes_the_socket() {
    let backend = MemBackend::patterned(SIZE);
    let server = TestServer::start_default(Kind::Unix, &backend).await;
    let path = server.socket_path().unwrap();
    assert!(path.exists());
    backend.set_hold(Hold::ReadsAt(0));
    let mut c = Raw::attached(&server.listen).await;
    let mut idle = Raw::haggling(&server.listen).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!path.exists(), "socket file not removed on shutdown");
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the request"
    );
    backend.release(1);
    assert_eq!(c.reply().await, (0, 1));
    let mut payload = vec![0u8; 512];
    c.read_exact(&mut payload).await;
    c.expect_closed().await;
    idle.expect_closed().await;
    stopping.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let backend = MemBackend::new(SIZE);
    init_tracing();
    let server = NbdServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listen = server.listen_addr().clone();
    let _task = tokio::spawn(server.run(config("vol"), backend.arc(), std::future::pending()));
    let mut c = Raw::greeted(&listen).await;
    let started = tokio::time::Instant::now();
    // No timeout here: the paused clock jumps to the server's deadline.
    let mut buf = [0u8; 1];
    let n = c.s.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binds_serves_and_cleans_up() {
    init_tracing();
    let backend = MemBackend::patterned(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.sock");
    // A socket file left by a crashed engine.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let listen: NbdListen = format!("unix:{}", path.display()).parse().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listen.clone(), config("vol"), backend.arc(), async {
        let _ = stopped.await;
    }));
    let mut c = loop {
        if let Ok(s) = tokio::net::UnixStream::connect(&path).await {
            let mut c = Raw { s: Box::new(s) };
            let mut g = [0u8; proto::GREETING_LEN];
            c.read_exact(&mut g).await;
            break c;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    c.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    let go = c.option(proto::OPT_GO, &info_data(b"vol", &[])).await;
    assert_eq!(go.last().unwrap().0, proto::REP_ACK);
    assert_eq!(c.read_block(1, 0, 512).await, backend.snapshot()[..512]);
    c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    c.expect_closed().await;
    stop.send(()).unwrap();
    tokio::time::timeout(STEP, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists());
}

/// A TCP client whose node vanishes (power cut, network gone) never closes
/// its connection; the server's keepalive probes close it, giving its
/// connection slot back. The kernel shows the probe timer on the server's
/// side of a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_probed_when_idle() {
    let backend = MemBackend::new(SIZE);
    let server = TestServer::start_default(Kind::Tcp, &backend).await;
    let NbdListen::Tcp(addr) = server.listen else {
        unreachable!("a TCP server")
    };
    let _client = Raw::greeted(&server.listen).await;
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("( sport = :{} )", addr.port()))
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() == 1 && text.contains("timer:(keepalive"),
        "the server's side of the connection has no keepalive timer:\n{text}"
    );
}
