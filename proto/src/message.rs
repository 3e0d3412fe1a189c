//! Messages: what a client asks ([`Request`]) and what a replica answers
//! ([`Reply`]). Each has a stable kind byte; fields are fixed-width
//! little-endian integers and u16-length-prefixed UTF-8 strings, with the
//! data payload (if any) last.
//!
//! A session is either bound to a volume (its [`Hello`] names one, and the
//! session may then do IO at the Hello's generation) or an admin session
//! (empty volume name: management calls only).

use bytes::{BufMut, Bytes};

use crate::aligned::{self, AlignedBuf};
use crate::error::{ErrorCode, ProtoError, RemoteError};
use crate::frame::{put_string, EncodedFrame, FieldReader, FrameBuilder, RawFrame, LARGE_BODY};
use crate::membership::Membership;
use crate::units::Generation;

/// Write flag: the data must be on stable storage before the reply.
pub const WRITE_FUA: u32 = 1;

/// First message on every connection, from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub version: u8,
    /// Who is connecting, for logs: e.g. `engine vol1 on node-a pid 42`.
    pub client: String,
    /// The volume this session does IO on; empty for an admin session.
    pub volume: String,
    /// The engine's generation. A volume session with a generation older
    /// than the replica's is refused; a newer one is persisted before the
    /// Welcome is sent. Zero asks only to look (no IO allowed).
    pub generation: Generation,
}

/// What a replica knows about one of its volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub generation: Generation,
}

/// The replica's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u8,
    /// The replica daemon's identity, for logs.
    pub server: String,
    /// The bound volume, for a volume session.
    pub volume: Option<VolumeInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Ping,
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    CreateVolume {
        name: String,
        size: u64,
    },
    DeleteVolume {
        name: String,
    },
    ListVolumes,
    GetVolume {
        name: String,
    },
    /// The bound volume's replica id, membership and dirty regions.
    GetState,
    /// Replaces the bound volume's membership (a higher epoch only).
    SetMembership(Membership),
    /// Clears these dirty regions (a bitmap, one bit per region): every
    /// replica acknowledged every write to them.
    MarkClean {
        bitmap: Bytes,
    },
    /// A 64-bit hash of each `chunk` bytes of `[offset, offset+len)`, to
    /// compare replicas without moving their data.
    Hashes {
        offset: u64,
        len: u64,
        chunk: u32,
    },
}

/// Most hashes one [`Request::Hashes`] may ask for.
pub const MAX_HASHES: u64 = 65536;

/// What a replica says about its copy of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaState {
    /// Chosen by the replica when the volume was created on it.
    pub replica_id: String,
    pub membership: Membership,
    /// Bytes per dirty-map region.
    pub region_size: u64,
    /// One bit per region, set where writes may not have reached every
    /// replica yet (or were made while a member was out).
    pub dirty: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Welcome(Welcome),
    Pong,
    /// Success for requests with nothing to return.
    Done,
    /// Read data.
    Data(Bytes),
    Volumes(Vec<VolumeInfo>),
    Volume(VolumeInfo),
    /// Answer to CreateVolume; `created` is false when the volume already
    /// existed with the same size (a no-op).
    Created {
        info: VolumeInfo,
        created: bool,
    },
    State(ReplicaState),
    Hashes(Vec<u64>),
    Error(RemoteError),
}

/// Where a frame's data payload starts in its body, for the kinds that
/// carry block data: a reader places such a body so that the payload lands
/// on an IO-aligned address (see `FrameReader`).
pub(crate) fn payload_offset(kind: u8) -> Option<usize> {
    match kind {
        // offset (u64) and flags (u32), then the data.
        kind::WRITE => Some(12),
        kind::DATA => Some(0),
        _ => None,
    }
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const READ: u8 = 0x10;
    pub const WRITE: u8 = 0x11;
    pub const FLUSH: u8 = 0x12;
    pub const TRIM: u8 = 0x13;
    pub const WRITE_ZEROES: u8 = 0x14;
    pub const CREATE_VOLUME: u8 = 0x20;
    pub const DELETE_VOLUME: u8 = 0x21;
    pub const LIST_VOLUMES: u8 = 0x22;
    pub const GET_VOLUME: u8 = 0x23;
    pub const GET_STATE: u8 = 0x30;
    pub const SET_MEMBERSHIP: u8 = 0x31;
    pub const MARK_CLEAN: u8 = 0x32;
    pub const HASHES: u8 = 0x33;

    pub const WELCOME: u8 = 0x81;
    pub const PONG: u8 = 0x82;
    pub const DONE: u8 = 0x83;
    pub const DATA: u8 = 0x84;
    pub const VOLUMES: u8 = 0x85;
    pub const VOLUME: u8 = 0x86;
    pub const CREATED: u8 = 0x87;
    pub const STATE: u8 = 0x88;
    pub const HASH_LIST: u8 = 0x89;
    pub const ERROR: u8 = 0xff;
}

impl Request {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Ping => "ping",
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::Flush => "flush",
            Request::Trim { .. } => "trim",
            Request::WriteZeroes { .. } => "write_zeroes",
            Request::CreateVolume { .. } => "create_volume",
            Request::DeleteVolume { .. } => "delete_volume",
            Request::ListVolumes => "list_volumes",
            Request::GetVolume { .. } => "get_volume",
            Request::GetState => "get_state",
            Request::SetMembership(_) => "set_membership",
            Request::MarkClean { .. } => "mark_clean",
            Request::Hashes { .. } => "hashes",
        }
    }

    pub fn encode(&self, id: u64) -> EncodedFrame {
        let k = match self {
            Request::Hello(_) => kind::HELLO,
            Request::Ping => kind::PING,
            Request::Read { .. } => kind::READ,
            Request::Write { .. } => kind::WRITE,
            Request::Flush => kind::FLUSH,
            Request::Trim { .. } => kind::TRIM,
            Request::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Request::CreateVolume { .. } => kind::CREATE_VOLUME,
            Request::DeleteVolume { .. } => kind::DELETE_VOLUME,
            Request::ListVolumes => kind::LIST_VOLUMES,
            Request::GetVolume { .. } => kind::GET_VOLUME,
            Request::GetState => kind::GET_STATE,
            Request::SetMembership(_) => kind::SET_MEMBERSHIP,
            Request::MarkClean { .. } => kind::MARK_CLEAN,
            Request::Hashes { .. } => kind::HASHES,
        };
        let mut f = FrameBuilder::new(k, id);
        let b = f.fields();
        let mut payload = None;
        match self {
            Request::Hello(h) => {
                b.put_u8(h.version);
                put_string(b, &h.client);
                put_string(b, &h.volume);
                b.put_u64_le(h.generation.0);
            }
            Request::Ping | Request::Flush | Request::ListVolumes | Request::GetState => {}
            Request::SetMembership(m) => m.put(b),
            Request::MarkClean { bitmap } => payload = Some(bitmap.clone()),
            Request::Hashes { offset, len, chunk } => {
                b.put_u64_le(*offset);
                b.put_u64_le(*len);
                b.put_u32_le(*chunk);
            }
            Request::Read { offset, len } => {
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
            }
            Request::Write { offset, fua, data } => {
                b.put_u64_le(*offset);
                b.put_u32_le(if *fua { WRITE_FUA } else { 0 });
                payload = Some(data.clone());
            }
            Request::Trim { offset, len } => {
                b.put_u64_le(*offset);
                b.put_u64_le(*len);
            }
            Request::WriteZeroes { offset, len, fua } => {
                b.put_u64_le(*offset);
                b.put_u64_le(*len);
                b.put_u32_le(if *fua { WRITE_FUA } else { 0 });
            }
            Request::CreateVolume { name, size } => {
                put_string(b, name);
                b.put_u64_le(*size);
            }
            Request::DeleteVolume { name } | Request::GetVolume { name } => put_string(b, name),
        }
        f.finish(payload)
    }

    pub fn decode(frame: &RawFrame) -> Result<Request, ProtoError> {
        let req = match frame.kind {
            kind::HELLO => {
                let mut r = FieldReader::of("hello", frame);
                let h = Hello {
                    version: r.u8()?,
                    client: r.string()?,
                    volume: r.string()?,
                    generation: Generation(r.u64()?),
                };
                r.end()?;
                Request::Hello(h)
            }
            kind::PING => empty("ping", frame, Request::Ping)?,
            kind::FLUSH => empty("flush", frame, Request::Flush)?,
            kind::LIST_VOLUMES => empty("list_volumes", frame, Request::ListVolumes)?,
            kind::GET_STATE => empty("get_state", frame, Request::GetState)?,
            kind::SET_MEMBERSHIP => {
                let mut r = FieldReader::of("set_membership", frame);
                let m = Membership::get(&mut r)?;
                r.end()?;
                Request::SetMembership(m)
            }
            kind::MARK_CLEAN => Request::MarkClean {
                bitmap: FieldReader::of("mark_clean", frame).rest(),
            },
            kind::HASHES => {
                let mut r = FieldReader::of("hashes", frame);
                let req = Request::Hashes {
                    offset: r.u64()?,
                    len: r.u64()?,
                    chunk: r.u32()?,
                };
                r.end()?;
                req
            }
            kind::READ => {
                let mut r = FieldReader::of("read", frame);
                let req = Request::Read {
                    offset: r.u64()?,
                    len: r.u32()?,
                };
                r.end()?;
                req
            }
            kind::WRITE => {
                let mut r = FieldReader::of("write", frame);
                let offset = r.u64()?;
                let flags = r.u32()?;
                Request::Write {
                    offset,
                    fua: flags & WRITE_FUA != 0,
                    data: out_of_receive_buffer(r.rest(), frame),
                }
            }
            kind::TRIM => {
                let mut r = FieldReader::of("trim", frame);
                let req = Request::Trim {
                    offset: r.u64()?,
                    len: r.u64()?,
                };
                r.end()?;
                req
            }
            kind::WRITE_ZEROES => {
                let mut r = FieldReader::of("write_zeroes", frame);
                let req = Request::WriteZeroes {
                    offset: r.u64()?,
                    len: r.u64()?,
                    fua: r.u32()? & WRITE_FUA != 0,
                };
                r.end()?;
                req
            }
            kind::CREATE_VOLUME => {
                let mut r = FieldReader::of("create_volume", frame);
                let req = Request::CreateVolume {
                    name: r.string()?,
                    size: r.u64()?,
                };
                r.end()?;
                req
            }
            kind::DELETE_VOLUME | kind::GET_VOLUME => {
                let mut r = FieldReader::of("volume request", frame);
                let name = r.string()?;
                r.end()?;
                if frame.kind == kind::DELETE_VOLUME {
                    Request::DeleteVolume { name }
                } else {
                    Request::GetVolume { name }
                }
            }
            other => return Err(ProtoError::UnknownKind(other)),
        };
        Ok(req)
    }
}

impl Reply {
    pub fn encode(&self, id: u64) -> EncodedFrame {
        let k = match self {
            Reply::Welcome(_) => kind::WELCOME,
            Reply::Pong => kind::PONG,
            Reply::Done => kind::DONE,
            Reply::Data(_) => kind::DATA,
            Reply::Volumes(_) => kind::VOLUMES,
            Reply::Volume(_) => kind::VOLUME,
            Reply::Created { .. } => kind::CREATED,
            Reply::State(_) => kind::STATE,
            Reply::Hashes(_) => kind::HASH_LIST,
            Reply::Error(_) => kind::ERROR,
        };
        let mut f = FrameBuilder::new(k, id);
        let b = f.fields();
        let mut payload = None;
        match self {
            Reply::Welcome(w) => {
                b.put_u8(w.version);
                put_string(b, &w.server);
                match &w.volume {
                    Some(v) => {
                        b.put_u8(1);
                        put_volume(b, v);
                    }
                    None => b.put_u8(0),
                }
            }
            Reply::Pong | Reply::Done => {}
            Reply::Data(data) => payload = Some(data.clone()),
            Reply::Volumes(list) => {
                b.put_u32_le(list.len() as u32);
                for v in list {
                    put_volume(b, v);
                }
            }
            Reply::Volume(v) => put_volume(b, v),
            Reply::Created { info, created } => {
                put_volume(b, info);
                b.put_u8(*created as u8);
            }
            Reply::State(st) => {
                put_string(b, &st.replica_id);
                st.membership.put(b);
                b.put_u64_le(st.region_size);
                payload = Some(st.dirty.clone());
            }
            Reply::Hashes(list) => {
                b.put_u32_le(list.len() as u32);
                for h in list {
                    b.put_u64_le(*h);
                }
            }
            Reply::Error(e) => {
                b.put_u16_le(e.code.to_u16());
                put_string(b, &e.message);
            }
        }
        f.finish(payload)
    }

    pub fn decode(frame: &RawFrame) -> Result<Reply, ProtoError> {
        let body = &frame.body;
        let reply = match frame.kind {
            kind::WELCOME => {
                let mut r = FieldReader::of("welcome", frame);
                let version = r.u8()?;
                let server = r.string()?;
                let volume = match r.u8()? {
                    0 => None,
                    _ => Some(get_volume(&mut r)?),
                };
                r.end()?;
                Reply::Welcome(Welcome {
                    version,
                    server,
                    volume,
                })
            }
            kind::PONG => empty("pong", frame, Reply::Pong)?,
            kind::DONE => empty("done", frame, Reply::Done)?,
            kind::DATA => Reply::Data(FieldReader::of("data", frame).rest()),
            kind::VOLUMES => {
                let mut r = FieldReader::of("volumes", frame);
                let n = r.u32()?;
                // Each entry needs at least 18 bytes, so a count that cannot
                // fit in the body is refused before anything is allocated.
                if n as usize > body.len() / 18 {
                    return Err(ProtoError::malformed("volumes", "count exceeds body"));
                }
                let mut list = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    list.push(get_volume(&mut r)?);
                }
                r.end()?;
                Reply::Volumes(list)
            }
            kind::VOLUME => {
                let mut r = FieldReader::of("volume", frame);
                let v = get_volume(&mut r)?;
                r.end()?;
                Reply::Volume(v)
            }
            kind::CREATED => {
                let mut r = FieldReader::of("created", frame);
                let info = get_volume(&mut r)?;
                let created = r.u8()? != 0;
                r.end()?;
                Reply::Created { info, created }
            }
            kind::STATE => {
                let mut r = FieldReader::of("state", frame);
                let replica_id = r.string()?;
                let membership = Membership::get(&mut r)?;
                let region_size = r.u64()?;
                Reply::State(ReplicaState {
                    replica_id,
                    membership,
                    region_size,
                    dirty: r.rest(),
                })
            }
            kind::HASH_LIST => {
                let mut r = FieldReader::of("hashes", frame);
                let n = r.u32()? as usize;
                if n > body.len() / 8 {
                    return Err(ProtoError::malformed("hashes", "count exceeds body"));
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(r.u64()?);
                }
                r.end()?;
                Reply::Hashes(list)
            }
            kind::ERROR => {
                let mut r = FieldReader::of("error", frame);
                let code = ErrorCode::from_u16(r.u16()?);
                let message = r.string()?;
                r.end()?;
                Reply::Error(RemoteError { code, message })
            }
            other => return Err(ProtoError::UnknownKind(other)),
        };
        Ok(reply)
    }
}

/// A write's payload, moved out of the connection's receive buffer at once
/// into the aligned memory an O_DIRECT replica writes from (a large one was
/// received there already, in memory of its own). The replica then makes no
/// copy of its own, and the receive buffer, no longer shared with the writes
/// still running, is reused for the next frames instead of replaced
/// (`FrameReader`). A small payload that happens to lie aligned in the
/// buffer is copied all the same.
fn out_of_receive_buffer(payload: Bytes, frame: &RawFrame) -> Bytes {
    if frame.body.len() >= LARGE_BODY && aligned::is_aligned(&payload) {
        payload
    } else {
        AlignedBuf::copy_from(&payload).into_bytes()
    }
}

fn empty<T>(kind: &'static str, frame: &RawFrame, value: T) -> Result<T, ProtoError> {
    FieldReader::of(kind, frame).end()?;
    Ok(value)
}

fn put_volume(b: &mut bytes::BytesMut, v: &VolumeInfo) {
    put_string(b, &v.name);
    b.put_u64_le(v.size);
    b.put_u64_le(v.generation.0);
}

fn get_volume(r: &mut FieldReader<'_>) -> Result<VolumeInfo, ProtoError> {
    Ok(VolumeInfo {
        name: r.string()?,
        size: r.u64()?,
        generation: Generation(r.u64()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;
    use bytes::BytesMut;

    fn round_trip_request(req: Request) {
        let enc = req.encode(42);
        let mut buf = BytesMut::from(&enc.to_vec()[..]);
        let raw = decode_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(raw.id, 42);
        assert_eq!(Request::decode(&raw).unwrap(), req);
    }

    fn round_trip_reply(reply: Reply) {
        let enc = reply.encode(7);
        let mut buf = BytesMut::from(&enc.to_vec()[..]);
        let raw = decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(raw.id, 7);
        assert_eq!(Reply::decode(&raw).unwrap(), reply);
    }

    #[test]
    fn a_decoded_write_owns_its_payload_in_aligned_memory() {
        for len in [4096, 8192, 100] {
            let data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
            let enc = Request::Write {
                offset: 0,
                fua: false,
                data: data.clone(),
            }
            .encode(1);
            let mut buf = BytesMut::from(&enc.to_vec()[..]);
            let raw = decode_frame(&mut buf).unwrap().unwrap();
            let Request::Write { data: got, .. } = Request::decode(&raw).unwrap() else {
                panic!("not a write");
            };
            assert_eq!(got, data);
            let body = raw.body.as_ptr_range();
            assert!(
                !body.contains(&got.as_ptr()),
                "the payload of {len} bytes still points into the frame"
            );
            assert_eq!(got.as_ptr() as usize % aligned::IO_ALIGN, 0);
        }
    }

    #[test]
    fn a_small_write_aligned_in_the_receive_buffer_is_copied_out_too() {
        // The frame's fields end just where a block starts in the buffer,
        // so the payload after them lies aligned.
        let fields = 12; // offset and flags, all zero
        let data: Vec<u8> = (0..aligned::IO_ALIGN).map(|i| (i % 251) as u8).collect();
        let mut whole = vec![0; 2 * aligned::IO_ALIGN];
        whole[aligned::IO_ALIGN..].copy_from_slice(&data);
        let buffer = AlignedBuf::copy_from(&whole).into_bytes();
        let body = buffer.slice(aligned::IO_ALIGN - fields..);
        let raw = RawFrame::new(kind::WRITE, 1, body);
        let Request::Write { data: got, .. } = Request::decode(&raw).unwrap() else {
            panic!("not a write");
        };
        assert_eq!(&got[..], &data[..]);
        assert!(
            !raw.body.as_ptr_range().contains(&got.as_ptr()),
            "the payload still points into the receive buffer"
        );
    }

    fn info(name: &str) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            size: 1 << 30,
            generation: Generation(3),
        }
    }

    fn sample_membership() -> Membership {
        use crate::membership::{Member, MemberState};
        Membership {
            epoch: 12,
            members: vec![
                Member {
                    id: "r-a".into(),
                    addr: "10.0.0.1:7700".into(),
                    state: MemberState::Healthy,
                },
                Member {
                    id: "r-b".into(),
                    addr: "10.0.0.2:7700".into(),
                    state: MemberState::Out,
                },
                Member {
                    id: "r-c".into(),
                    addr: "node-c:7700".into(),
                    state: MemberState::Rebuilding,
                },
            ],
        }
    }

    #[test]
    fn every_request_round_trips() {
        for req in [
            Request::Hello(Hello {
                version: 1,
                client: "engine test".into(),
                volume: "vol-1".into(),
                generation: Generation(9),
            }),
            Request::Ping,
            Request::Read {
                offset: 4096,
                len: 65536,
            },
            Request::Write {
                offset: 1 << 40,
                fua: true,
                data: Bytes::from(vec![0xab; 8192]),
            },
            Request::Write {
                offset: 0,
                fua: false,
                data: Bytes::new(),
            },
            Request::Flush,
            Request::Trim {
                offset: 512,
                len: 1 << 33,
            },
            Request::WriteZeroes {
                offset: 8,
                len: 9,
                fua: true,
            },
            Request::CreateVolume {
                name: "v".into(),
                size: 10 << 30,
            },
            Request::DeleteVolume { name: "v".into() },
            Request::ListVolumes,
            Request::GetVolume { name: "ü".into() },
            Request::GetState,
            Request::SetMembership(sample_membership()),
            Request::MarkClean {
                bitmap: Bytes::from_static(&[0b1010_0001, 0, 7]),
            },
            Request::Hashes {
                offset: 1 << 20,
                len: 4 << 20,
                chunk: 65536,
            },
        ] {
            round_trip_request(req);
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for reply in [
            Reply::Welcome(Welcome {
                version: 1,
                server: "replica a".into(),
                volume: Some(info("a")),
            }),
            Reply::Welcome(Welcome {
                version: 1,
                server: "replica b".into(),
                volume: None,
            }),
            Reply::Pong,
            Reply::Done,
            Reply::Data(Bytes::from_static(b"block data")),
            Reply::Volumes(vec![]),
            Reply::Volumes(vec![info("a"), info("b")]),
            Reply::Volume(info("c")),
            Reply::Created {
                info: info("d"),
                created: true,
            },
            Reply::State(ReplicaState {
                replica_id: "r-1f2e".into(),
                membership: sample_membership(),
                region_size: 4 << 20,
                dirty: Bytes::from_static(&[1, 2, 3, 0xff]),
            }),
            Reply::Hashes(vec![]),
            Reply::Hashes(vec![1, u64::MAX, 0x0123_4567_89ab_cdef]),
            Reply::Error(RemoteError::new(ErrorCode::StaleGeneration, "older engine")),
            Reply::Error(RemoteError::new(ErrorCode::Other(999), "from the future")),
        ] {
            round_trip_reply(reply);
        }
    }

    /// The handshake's bytes are part of the protocol: a change here breaks
    /// every deployed replica daemon, so it must be a deliberate one.
    #[test]
    fn hello_bytes_are_pinned() {
        let hello = Request::Hello(Hello {
            version: 1,
            client: "e1".into(),
            volume: "v".into(),
            generation: Generation(5),
        });
        let bytes = hello.encode(1).to_vec();
        let mut expected = vec![
            b'S', b'H', b'R', b'P', // magic
            1,    // version
            0x01, // kind: hello
            0, 0, // flags
            1, 0, 0, 0, 0, 0, 0, 0, // id
            16, 0, 0, 0, // body length
        ];
        let mut crc = crc32fast::Hasher::new();
        crc.update(&expected);
        let body = [
            1, // protocol version
            2, 0, b'e', b'1', // client
            1, 0, b'v', // volume
            5, 0, 0, 0, 0, 0, 0, 0, // generation
        ];
        crc.update(&body);
        let sum = crc.finalize();
        assert_eq!(sum, 0x8e65_a7c8, "crc of the pinned hello changed");
        expected.extend_from_slice(&sum.to_le_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(bytes, expected);
    }

    /// The handshake's answer is pinned like the Hello. The checksums were
    /// computed apart from this crate (Python's `zlib.crc32` over header
    /// bytes 0..20 and the body), so a change in how the crate checksums
    /// is caught too.
    #[test]
    fn welcome_bytes_are_pinned() {
        let volume_session = Reply::Welcome(Welcome {
            version: 1,
            server: "r1".into(),
            volume: Some(VolumeInfo {
                name: "v".into(),
                size: 1 << 20,
                generation: Generation(5),
            }),
        });
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            b'S', b'H', b'R', b'P', // magic
            1,    // version
            0x81, // kind: welcome
            0, 0, // flags
            1, 0, 0, 0, 0, 0, 0, 0, // id
            25, 0, 0, 0, // body length
            0x98, 0x2c, 0x29, 0x7a, // crc 0x7a292c98
            1, // protocol version
            2, 0, b'r', b'1', // server
            1, // a volume follows
            1, 0, b'v', // volume name
            0, 0, 0x10, 0, 0, 0, 0, 0, // size: 1 MiB
            5, 0, 0, 0, 0, 0, 0, 0, // generation
        ];
        assert_eq!(volume_session.encode(1).to_vec(), expected);

        let admin_session = Reply::Welcome(Welcome {
            version: 1,
            server: "r1".into(),
            volume: None,
        });
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            b'S', b'H', b'R', b'P', // magic
            1,    // version
            0x81, // kind: welcome
            0, 0, // flags
            1, 0, 0, 0, 0, 0, 0, 0, // id
            6, 0, 0, 0, // body length
            0x36, 0x36, 0x98, 0x58, // crc 0x58983636
            1, // protocol version
            2, 0, b'r', b'1', // server
            0, // no volume
        ];
        assert_eq!(admin_session.encode(1).to_vec(), expected);
    }

    #[test]
    fn short_and_trailing_bodies_are_malformed() {
        let mut enc = Request::Read { offset: 1, len: 2 }.encode(1).to_vec();
        // Claim one more body byte than the fields need, fix up the crc.
        enc.push(0);
        let len = u32::from_le_bytes(enc[16..20].try_into().unwrap()) + 1;
        enc[16..20].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&enc[..20]);
        crc.update(&enc[24..]);
        enc[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
        let raw = decode_frame(&mut BytesMut::from(&enc[..]))
            .unwrap()
            .unwrap();
        assert!(matches!(
            Request::decode(&raw),
            Err(ProtoError::Malformed { .. })
        ));

        let raw = RawFrame::new(0x10, 1, Bytes::from_static(&[1, 2, 3]));
        assert!(matches!(
            Request::decode(&raw),
            Err(ProtoError::Malformed { .. })
        ));
        let raw = RawFrame::new(0x55, 1, Bytes::new());
        assert!(matches!(
            Request::decode(&raw),
            Err(ProtoError::UnknownKind(0x55))
        ));
    }
}
