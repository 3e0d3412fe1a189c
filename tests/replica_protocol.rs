//! The replica protocol is pipelined: a client may send many requests on one
//! connection before it reads a single reply, and a real replica daemon
//! answers every one exactly once, tagged with its request id, in whatever
//! order the requests finish. Spoken in raw frames, so nothing of the
//! engine's client stands between the test and the daemon.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use bytes::{Bytes, BytesMut};
use rand::{RngCore, SeedableRng};
use shorthorn_proto::frame::decode_frame;
use shorthorn_proto::{Generation, Hello, Reply, Request, VolumeInfo, PROTOCOL_VERSION};

use common::bad_input::{MIB, STEP};
use common::*;

/// One raw connection to a replica daemon.
struct Conn {
    s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Connects and says hello; returns the connection and the answer.
    fn hello(addr: &str, volume: &str, generation: u64) -> (Conn, Reply) {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(STEP)).unwrap();
        s.set_write_timeout(Some(STEP)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Conn {
            s,
            buf: BytesMut::new(),
        };
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "replica_protocol test".into(),
            volume: volume.into(),
            generation: Generation(generation),
        });
        c.send(&[(1, hello)]);
        let (id, reply) = c.next();
        assert_eq!(id, 1, "the welcome does not echo the hello's id");
        (c, reply)
    }

    /// Sends every request in one write, before reading anything.
    fn send(&mut self, requests: &[(u64, Request)]) {
        let mut bytes = Vec::new();
        for (id, request) in requests {
            bytes.extend_from_slice(&request.encode(*id).to_vec());
        }
        self.s
            .write_all(&bytes)
            .expect("send to the replica daemon");
    }

    /// The next reply; panics if the daemon hangs up or stays silent.
    fn next(&mut self) -> (u64, Reply) {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            if let Some(raw) = decode_frame(&mut self.buf).expect("the daemon sent a bad frame") {
                let reply = Reply::decode(&raw).expect("the daemon sent an undecodable reply");
                return (raw.id, reply);
            }
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("the daemon closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("no reply from the daemon within {STEP:?}: {e}"),
            }
        }
    }

    /// Sends `requests` all at once, then collects one reply per request:
    /// each id must be one of those sent, and answered only once.
    fn burst(&mut self, requests: &[(u64, Request)]) -> HashMap<u64, Reply> {
        self.send(requests);
        let mut replies = HashMap::new();
        let mut order = Vec::new();
        while replies.len() < requests.len() {
            let (id, reply) = self.next();
            assert!(
                requests.iter().any(|(sent, _)| *sent == id),
                "a reply for id {id}, which was never sent: {reply:?}"
            );
            assert!(
                !matches!(reply, Reply::Error(_)),
                "request {id} was refused: {reply:?}"
            );
            if let Some(first) = replies.insert(id, reply) {
                panic!("id {id} answered twice (first {first:?})");
            }
            order.push(id);
        }
        // For the record: how many replies overtook one to a request sent
        // earlier (any number is right; the daemon runs requests at once).
        let sent_at = |id: &u64| requests.iter().position(|(s, _)| s == id).unwrap();
        let mut latest = 0;
        let mut overtaken = 0;
        for id in &order {
            let at = sent_at(id);
            if at < latest {
                overtaken += 1;
            }
            latest = latest.max(at);
        }
        eprintln!(
            "{} replies, {overtaken} of them after a reply to a later request",
            order.len()
        );
        replies
    }

    /// Nothing else is on its way: a ping sent now is answered next (a
    /// stray second answer to an earlier request would come first).
    fn assert_in_step(&mut self, id: u64) {
        self.send(&[(id, Request::Ping)]);
        assert_eq!(self.next(), (id, Reply::Pong), "a stray reply");
    }
}

fn volume_info(addr: &str, name: &str) -> VolumeInfo {
    let (mut c, welcome) = Conn::hello(addr, "", 0);
    assert!(matches!(welcome, Reply::Welcome(_)), "{welcome:?}");
    c.send(&[(2, Request::GetVolume { name: name.into() })]);
    match c.next() {
        (2, Reply::Volume(v)) => v,
        other => panic!("get {name}: {other:?}"),
    }
}

/// Random bytes, different for every seed.
fn block(len: usize, seed: u64) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    Bytes::from(v)
}

/// Ids that are neither small nor in sequence: the daemon must echo
/// whatever the client chose.
fn id_of(burst: u64, i: u64) -> u64 {
    (burst << 32) + 1000 + i * 7
}

const WRITES: u64 = 32;
/// Each of the first burst's writes has a 64 KiB slot of its own; its
/// length varies so that requests take different times.
const SLOT: u64 = 64 << 10;

fn write_len(i: u64) -> usize {
    4096 * (1 + (i as usize * 5) % 16)
}

/// 32 writes, then reads and pings, each burst sent whole before a single
/// reply is read; every reply is matched to its request by id.
#[test]
fn pipelined_requests_are_each_answered_once_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("pipe", "8MiB", &[&r]);
    let size = 8 * MIB as u64;
    let g = volume_info(&r.addr, "pipe").generation.0 + 1;
    let (mut c, welcome) = Conn::hello(&r.addr, "pipe", g);
    match &welcome {
        Reply::Welcome(w) => {
            let v = w
                .volume
                .as_ref()
                .expect("a volume session without a volume");
            assert_eq!((v.name.as_str(), v.size), ("pipe", size), "{w:?}");
        }
        other => panic!("hello at g{g} refused: {other:?}"),
    }

    // Burst 1: 32 writes to [0, 2 MiB), reads of the never-written upper
    // half (zeroes, whatever the writes do), and pings among them.
    let data: Vec<Bytes> = (0..WRITES).map(|i| block(write_len(i), i)).collect();
    let mut first = Vec::new();
    for i in 0..WRITES {
        first.push((
            id_of(1, i),
            Request::Write {
                offset: i * SLOT,
                fua: i % 8 == 0,
                data: data[i as usize].clone(),
            },
        ));
        if i % 8 == 7 {
            first.push((id_of(1, 100 + i), Request::Ping));
            first.push((
                id_of(1, 200 + i),
                Request::Read {
                    offset: size / 2 + i * SLOT,
                    len: SLOT as u32,
                },
            ));
        }
    }
    let replies = c.burst(&first);
    for (id, request) in &first {
        let reply = &replies[id];
        match request {
            Request::Write { .. } => assert_eq!(reply, &Reply::Done, "write {id}"),
            Request::Ping => assert_eq!(reply, &Reply::Pong, "ping {id}"),
            Request::Read { len, .. } => assert_eq!(
                reply,
                &Reply::Data(Bytes::from(vec![0; *len as usize])),
                "read {id} of untouched space"
            ),
            _ => unreachable!(),
        }
    }
    c.assert_in_step(id_of(1, 999));

    // Burst 2: read every write back, newest first, while writes to the
    // upper half (away from every read) and pings are in flight.
    let mut second = Vec::new();
    for i in (0..WRITES).rev() {
        second.push((
            id_of(2, i),
            Request::Read {
                offset: i * SLOT,
                len: write_len(i) as u32,
            },
        ));
        if i % 4 == 0 {
            second.push((
                id_of(2, 100 + i),
                Request::Write {
                    offset: size / 2 + i * SLOT,
                    fua: false,
                    data: block(SLOT as usize, 1000 + i),
                },
            ));
            second.push((id_of(2, 200 + i), Request::Ping));
        }
    }
    second.push((id_of(2, 300), Request::Flush));
    let replies = c.burst(&second);
    for i in 0..WRITES {
        assert_eq!(
            replies[&id_of(2, i)],
            Reply::Data(data[i as usize].clone()),
            "read {i} does not return what write {i} wrote"
        );
    }
    for (id, request) in &second {
        match request {
            Request::Write { .. } | Request::Flush => {
                assert_eq!(replies[id], Reply::Done, "{} {id}", request.name())
            }
            Request::Ping => assert_eq!(replies[id], Reply::Pong, "ping {id}"),
            _ => {}
        }
    }
    c.assert_in_step(id_of(2, 999));

    // The second burst's writes landed too, and only where they were sent:
    // the bytes between the first burst's writes are still zero.
    for i in (0..WRITES).step_by(4) {
        let id = id_of(3, i);
        c.send(&[(
            id,
            Request::Read {
                offset: size / 2 + i * SLOT,
                len: SLOT as u32,
            },
        )]);
        assert_eq!(
            c.next(),
            (id, Reply::Data(block(SLOT as usize, 1000 + i))),
            "upper-half write {i}"
        );
    }
    let gap = write_len(1) as u64;
    assert!(gap < SLOT);
    c.send(&[(
        id_of(3, 500),
        Request::Read {
            offset: SLOT + gap,
            len: (SLOT - gap) as u32,
        },
    )]);
    assert_eq!(
        c.next(),
        (
            id_of(3, 500),
            Reply::Data(Bytes::from(vec![0; (SLOT - gap) as usize]))
        ),
        "bytes past write 1 changed"
    );
}
