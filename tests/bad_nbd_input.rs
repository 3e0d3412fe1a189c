//! Broken NBD clients against a real engine's NBD port (DESIGN.md
//! invariant 8): garbage in the handshake, requests out of range or of
//! kinds the engine does not serve, protocol violations and hang-ups
//! mid-frame. After each, the engine still runs and serves a fresh
//! connection, a client attached from the start keeps reading, and the
//! volume holds exactly the bytes written before, through the engine and on
//! each replica alone.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use rand::{Rng, RngCore, SeedableRng};
use shorthorn_engine::nbd::proto as nbd;

use common::bad_input::*;
use common::*;

/// A hand-driven NBD client on an engine's unix socket.
struct Nbd {
    s: UnixStream,
}

impl Nbd {
    fn connect(socket: &Path) -> Nbd {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        s.set_write_timeout(Some(STEP)).unwrap();
        Nbd { s }
    }

    fn greeted(socket: &Path) -> Nbd {
        let mut c = Nbd::connect(socket);
        let mut g = [0u8; nbd::GREETING_LEN];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(
            u64::from_be_bytes(g[0..8].try_into().unwrap()),
            nbd::NBD_MAGIC
        );
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().unwrap()),
            nbd::OPTION_MAGIC
        );
        c
    }

    fn haggling(socket: &Path) -> Nbd {
        let mut c = Nbd::greeted(socket);
        c.send(&(nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    fn attached(socket: &Path) -> Nbd {
        let mut c = Nbd::haggling(socket);
        let go = c.option(nbd::OPT_GO, &info_request(b""));
        assert_eq!(go.last().unwrap().0, nbd::REP_ACK, "GO refused: {go:?}");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the engine");
    }

    fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn read_exact(&mut self, buf: &mut [u8]) {
        self.s.read_exact(buf).expect("read from the engine");
    }

    fn option_header(option: u32, len: u32) -> Vec<u8> {
        let mut out = nbd::OPTION_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    /// Sends an option; returns its replies up to the final one.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Nbd::option_header(option, data.len() as u32);
        out.extend_from_slice(data);
        self.send(&out);
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.read_exact(&mut h);
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                nbd::OPTION_REPLY_MAGIC
            );
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            self.read_exact(&mut data);
            replies.push((ty, data));
            if ty != nbd::REP_INFO && ty != nbd::REP_SERVER {
                return replies;
            }
        }
    }

    fn header(command: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        nbd::RequestHeader {
            magic: nbd::REQUEST_MAGIC,
            flags,
            command,
            handle,
            offset,
            len,
        }
        .encode()
    }

    fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        self.send(&Nbd::header(command, flags, handle, offset, len));
    }

    /// One simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; nbd::SIMPLE_REPLY_LEN];
        self.read_exact(&mut r);
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            nbd::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn read_block(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(nbd::CMD_READ, 0, handle, offset, len);
        assert_eq!(self.reply(), (0, handle), "read at {offset}");
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data);
        data
    }

    /// The engine hangs up (EOF or reset) without sending anything more.
    fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 256];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the engine kept the connection open")
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(n) => panic!("{what}: expected a close, got {n} bytes: {:?}", &buf[..n]),
        }
    }
}

/// The data of NBD_OPT_GO / NBD_OPT_INFO: name, then no info requests.
fn info_request(name: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn slice_of(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(file).unwrap();
    data[offset as usize..offset as usize + len].to_vec()
}

/// The engine still serves: a fresh `nbdinfo` sees the export's size, and
/// `qemu-io` reads a block that matches `src`.
fn assert_engine_serves(engine: &mut Engine, size: u64, src: &Path, after: &str) {
    assert!(
        engine.proc.is_running(),
        "engine died after {after}:\n{}",
        engine.proc.log_text()
    );
    let out = run(Command::new("nbdinfo").arg("--size").arg(engine.uri()));
    let seen: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(seen, size, "after {after}");
    let mut c = Nbd::attached(&engine.socket);
    assert_eq!(
        c.read_block(1, 1 << 20, 4096),
        slice_of(src, 1 << 20, 4096),
        "after {after}"
    );
    c.request(nbd::CMD_DISC, 0, 2, 0, 0);
    c.expect_closed("disconnect");
}

#[test]
fn engine_nbd_port_survives_bad_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("nbdvol", "16MiB", &[&r1, &r2]);
    let size = 16u64 << 20;
    let src = tmp.path().join("src.img");
    random_file(&src, 16 * MIB, 84);
    let mut engine = Engine::start(tmp.path(), "nbdvol", &[&r1, &r2]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(engine.uri()));
    let sock = engine.socket.clone();
    // A client attached from the start must survive everything below.
    let mut bystander = Nbd::attached(&sock);

    // Handshake: garbage instead of the client flags.
    let mut c = Nbd::greeted(&sock);
    c.send_lossy(b"GET / HTTP/1.1\r\nHost: engine\r\n\r\n");
    c.expect_closed("HTTP in the handshake");
    // Random bytes after the greeting.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..10 {
        let mut c = Nbd::greeted(&sock);
        let mut junk = vec![0u8; rng.gen_range(1..600)];
        rng.fill_bytes(&mut junk);
        c.send_lossy(&junk);
        drop(c);
    }
    // A wrong option magic.
    let mut c = Nbd::haggling(&sock);
    c.send(&[0xde; 16]);
    c.expect_closed("bad option magic");
    // An absurd option length: closed without waiting for 4 GiB.
    let mut c = Nbd::haggling(&sock);
    c.send(&Nbd::option_header(nbd::OPT_GO, u32::MAX));
    c.expect_closed("absurd option length");
    // Option data that contradicts itself is refused politely, and the
    // negotiation goes on.
    let mut c = Nbd::haggling(&sock);
    let mut lying = 1000u32.to_be_bytes().to_vec();
    lying.extend_from_slice(b"nbdvol\0\0");
    assert_eq!(c.option(nbd::OPT_GO, &lying)[0].0, nbd::REP_ERR_INVALID);
    assert_eq!(c.option(nbd::OPT_INFO, b"\0")[0].0, nbd::REP_ERR_INVALID);
    assert_eq!(c.option(nbd::OPT_LIST, b"x")[0].0, nbd::REP_ERR_INVALID);
    assert_eq!(c.option(0x4242, b"what")[0].0, nbd::REP_ERR_UNSUP);
    assert_eq!(
        c.option(nbd::OPT_GO, &info_request(b"not-this-one"))[0].0,
        nbd::REP_ERR_UNKNOWN
    );
    let go = c.option(nbd::OPT_GO, &info_request(b"nbdvol"));
    assert_eq!(go.last().unwrap().0, nbd::REP_ACK);
    assert_eq!(c.read_block(9, 0, 4096), slice_of(&src, 0, 4096));
    // An option header cut short, then a hang-up.
    let mut c = Nbd::haggling(&sock);
    c.send(&nbd::OPTION_MAGIC.to_be_bytes()[..5]);
    drop(c);
    assert_engine_serves(&mut engine, size, &src, "handshake garbage");

    // Transmission: requests the engine must refuse with an error reply,
    // keeping the connection in step.
    let mut c = Nbd::attached(&sock);
    let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
        (nbd::CMD_READ, 0, size, 4096, nbd::EINVAL),
        (nbd::CMD_READ, 0, size - 4096, 8192, nbd::EINVAL),
        (nbd::CMD_READ, 0, u64::MAX - 511, 1024, nbd::EINVAL),
        (nbd::CMD_READ, 0, 0, nbd::MAX_BLOCK_SIZE + 512, nbd::EINVAL),
        (nbd::CMD_READ, 0, 0, u32::MAX, nbd::EINVAL),
        (nbd::CMD_READ, 0, 3, 512, nbd::EINVAL),
        (nbd::CMD_TRIM, 0, size - 4096, 8192, nbd::EINVAL),
        (nbd::CMD_TRIM, 0, u64::MAX - 511, 1024, nbd::EINVAL),
        (nbd::CMD_WRITE_ZEROES, 0, size - 4096, 8192, nbd::ENOSPC),
        (nbd::CMD_WRITE_ZEROES, 0, u64::MAX - 511, 1024, nbd::ENOSPC),
        (nbd::CMD_WRITE_ZEROES, 0, 0, u32::MAX, nbd::ENOSPC),
        (nbd::CMD_CACHE, 0, 0, 512, nbd::EINVAL),
        (nbd::CMD_BLOCK_STATUS, 0, 0, 512, nbd::EINVAL),
        (9, 0, 0, 512, nbd::EINVAL),
        (0xffff, 0, 0, 0, nbd::EINVAL),
        (nbd::CMD_READ, 0x8000, 0, 512, nbd::EINVAL),
    ];
    for (i, (command, flags, offset, len, want)) in cases.iter().enumerate() {
        c.request(*command, *flags, i as u64, *offset, *len);
        assert_eq!(
            c.reply(),
            (*want, i as u64),
            "case {i}: command {command} at {offset} len {len}"
        );
    }
    // Writes carry their payload even when refused.
    let writes: Vec<(u64, u32, u32)> = vec![
        (size, 4096, nbd::ENOSPC),
        (size - 4096, 8192, nbd::ENOSPC),
        (u64::MAX - 4095, 8192, nbd::ENOSPC),
        (100, 512, nbd::EINVAL),
    ];
    for (i, (offset, len, want)) in writes.iter().enumerate() {
        let handle = 100 + i as u64;
        c.request(nbd::CMD_WRITE, 0, handle, *offset, *len);
        c.send(&vec![0xee; *len as usize]);
        assert_eq!(c.reply(), (*want, handle), "write at {offset} len {len}");
    }
    assert_eq!(
        c.read_block(200, size - 4096, 4096),
        slice_of(&src, size - 4096, 4096)
    );
    drop(c);
    assert_engine_serves(&mut engine, size, &src, "refused requests");

    // Protocol violations close only their own connection.
    let mut c = Nbd::attached(&sock);
    let mut bad = Nbd::header(nbd::CMD_WRITE, 0, 1, 0, 4096);
    bad[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c.send(&bad);
    c.send_lossy(&[0xee; 4096]);
    c.expect_closed("bad request magic");
    // A write too long even to throw away.
    let mut c = Nbd::attached(&sock);
    c.request(nbd::CMD_WRITE, 0, 1, 0, u32::MAX);
    c.send_lossy(&[0xee; 65536]);
    c.expect_closed("4 GiB write");
    // A header cut short, then a hang-up.
    let mut c = Nbd::attached(&sock);
    c.send(&Nbd::header(nbd::CMD_WRITE, 0, 1, 0, 4096)[..11]);
    drop(c);
    // A write whose payload stops half way, then a hang-up: nothing lands.
    let mut c = Nbd::attached(&sock);
    c.request(nbd::CMD_WRITE, 0, 1, 65536, 65536);
    c.send(&[0xee; 30000]);
    c.s.shutdown(Shutdown::Write).unwrap();
    c.expect_closed("half a write");
    // Random bytes after a good handshake.
    for _ in 0..10 {
        let mut c = Nbd::attached(&sock);
        let mut junk = vec![0u8; rng.gen_range(1..300)];
        rng.fill_bytes(&mut junk);
        junk[0] = 0x42;
        c.send_lossy(&junk);
        drop(c);
    }
    assert_eq!(
        bystander.read_block(1, 4096, 4096),
        slice_of(&src, 4096, 4096),
        "the bystander connection was disturbed"
    );
    assert_engine_serves(&mut engine, size, &src, "protocol violations");

    // Every byte is still the one written before.
    let back = tmp.path().join("back.img");
    run(Command::new("nbdcopy").arg(engine.uri()).arg(&back));
    assert!(files_equal(&src, &back), "bad NBD input changed the volume");
    drop(bystander);
    stop(&mut engine);
    // And each replica alone agrees.
    for only in [&r1, &r2] {
        assert_volume_holds(tmp.path(), "nbdvol", &[only], &src);
    }
}
