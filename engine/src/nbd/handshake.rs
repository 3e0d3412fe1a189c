//! The fixed newstyle handshake: greeting, client flags, option haggling.
//!
//! Owns everything that happens on a connection before transmission starts.
//! It answers every option it understands, refuses the rest with
//! `NBD_REP_ERR_UNSUP` and goes on, and hangs up only on what the protocol
//! calls a violation (bad magic, unknown client flags, an absurd option
//! length, an unknown name in `NBD_OPT_EXPORT_NAME`). It never touches the
//! backend: the export's size and flags are handed to it.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, OptionHeader};

/// Option data longer than this ends the connection: the longest allowed
/// export name plus the length fields and a generous list of info requests.
pub const MAX_OPTION_LEN: u32 = (proto::MAX_STRING_LEN as u32) + 512;

/// Options answered on one connection before it is deemed abusive and closed.
pub const MAX_OPTIONS: usize = 128;

/// What the client is negotiating for.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub transmission_flags: u16,
}

impl ExportInfo {
    /// The default export ("") and the configured name both select our one
    /// export.
    fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// How option haggling ended, when it ended without a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// The client chose the export: transmission starts on this connection.
    Transmission,
    /// The client sent `NBD_OPT_ABORT` (or hung up between options).
    Aborted,
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Runs the server side of the handshake on a fresh connection.
///
/// An `Err` means the connection must be closed: the client broke the
/// protocol, or the socket failed.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    export: &ExportInfo,
) -> io::Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let no_zeroes = greet(reader, writer).await?;
    let mut out = BytesMut::with_capacity(256);
    for _ in 0..MAX_OPTIONS {
        let Some((header, data)) = read_option(reader).await? else {
            return Ok(Negotiated::Aborted);
        };
        out.clear();
        let outcome = answer_option(header.option, &data, export, no_zeroes, &mut out)?;
        writer.write_all(&out).await?;
        writer.flush().await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
    Err(violation(format!("more than {MAX_OPTIONS} options")))
}

/// Runs the handshake of a connection the server will not serve, to say
/// why: every option that can carry an error is answered with
/// `NBD_REP_ERR_POLICY` and `reason` (libnbd and qemu show it to their
/// user); `NBD_OPT_ABORT` and `NBD_OPT_EXPORT_NAME` (which has no way to
/// say no) end it.
pub async fn refuse<R, W>(reader: &mut R, writer: &mut W, reason: &str) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    greet(reader, writer).await?;
    let mut out = BytesMut::with_capacity(256);
    for _ in 0..MAX_OPTIONS {
        let Some((header, _)) = read_option(reader).await? else {
            return Ok(());
        };
        out.clear();
        match header.option {
            proto::OPT_EXPORT_NAME => return Ok(()),
            proto::OPT_ABORT => {
                proto::put_option_reply(&mut out, header.option, proto::REP_ACK, &[])
            }
            option => {
                proto::put_option_reply(&mut out, option, proto::REP_ERR_POLICY, reason.as_bytes())
            }
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
        if header.option == proto::OPT_ABORT {
            return Ok(());
        }
    }
    Err(violation(format!("more than {MAX_OPTIONS} options")))
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s answer.
async fn greet<R, W>(reader: &mut R, writer: &mut W) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::greeting()).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(client_flags & proto::FLAG_C_NO_ZEROES != 0)
}

/// The client's next option and its data; `None` when the client hung up
/// between options (libnbd does after some failed negotiations), which is
/// not an error of ours.
async fn read_option<R>(reader: &mut R) -> io::Result<Option<(OptionHeader, Vec<u8>)>>
where
    R: AsyncRead + Unpin,
{
    let mut raw = [0u8; proto::OPTION_HEADER_LEN];
    match reader.read_exact(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header = OptionHeader::decode(&raw);
    if header.magic != proto::OPTION_MAGIC {
        return Err(violation(format!("bad option magic {:#x}", header.magic)));
    }
    if header.len > MAX_OPTION_LEN {
        return Err(violation(format!(
            "option {} carries {} bytes, more than {MAX_OPTION_LEN}",
            header.option, header.len
        )));
    }
    let mut data = vec![0u8; header.len as usize];
    reader.read_exact(&mut data).await?;
    tracing::debug!(option = header.option, len = header.len, "NBD option");
    Ok(Some((header, data)))
}

/// Writes the answer to one option into `out`; returns `Some` when haggling
/// is over.
fn answer_option(
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    no_zeroes: bool,
    out: &mut BytesMut,
) -> io::Result<Option<Negotiated>> {
    match option {
        proto::OPT_EXPORT_NAME => {
            // This option has no way to say no: an unknown name ends the
            // session, as the protocol requires.
            if !export.matches(data) {
                return Err(violation(format!(
                    "unknown export {:?} in NBD_OPT_EXPORT_NAME",
                    String::from_utf8_lossy(data)
                )));
            }
            out.extend_from_slice(&export.size.to_be_bytes());
            out.extend_from_slice(&export.transmission_flags.to_be_bytes());
            if !no_zeroes {
                out.extend_from_slice(&[0u8; proto::EXPORT_NAME_PADDING]);
            }
            Ok(Some(Negotiated::Transmission))
        }
        proto::OPT_ABORT => {
            proto::put_option_reply(out, option, proto::REP_ACK, &[]);
            Ok(Some(Negotiated::Aborted))
        }
        proto::OPT_LIST => {
            if !data.is_empty() {
                proto::put_option_reply(
                    out,
                    option,
                    proto::REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data",
                );
                return Ok(None);
            }
            let name = export.name.as_bytes();
            let mut server = Vec::with_capacity(4 + name.len());
            server.extend_from_slice(&(name.len() as u32).to_be_bytes());
            server.extend_from_slice(name);
            proto::put_option_reply(out, option, proto::REP_SERVER, &server);
            proto::put_option_reply(out, option, proto::REP_ACK, &[]);
            Ok(None)
        }
        proto::OPT_INFO | proto::OPT_GO => answer_info(option, data, export, out),
        proto::OPT_STRUCTURED_REPLY => {
            proto::put_option_reply(
                out,
                option,
                proto::REP_ERR_UNSUP,
                b"structured replies are not supported",
            );
            Ok(None)
        }
        _ => {
            proto::put_option_reply(out, option, proto::REP_ERR_UNSUP, b"option not supported");
            Ok(None)
        }
    }
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO` share one request layout: name length,
/// name, count of info requests, the requests (16 bits each).
fn answer_info(
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    out: &mut BytesMut,
) -> io::Result<Option<Negotiated>> {
    let Some(request) = InfoRequest::parse(data) else {
        proto::put_option_reply(out, option, proto::REP_ERR_INVALID, b"malformed request");
        return Ok(None);
    };
    if !export.matches(request.name) {
        proto::put_option_reply(out, option, proto::REP_ERR_UNKNOWN, b"no such export");
        return Ok(None);
    }
    proto::put_option_reply(
        out,
        option,
        proto::REP_INFO,
        &proto::info_export(export.size, export.transmission_flags),
    );
    // Sent whether asked or not: clients that did not ask ignore it, and the
    // defaults it replaces (minimum 1) are looser than what we enforce.
    proto::put_option_reply(out, option, proto::REP_INFO, &proto::info_block_size());
    if request.wants(proto::INFO_NAME) {
        let name = proto::info_string(proto::INFO_NAME, &export.name);
        proto::put_option_reply(out, option, proto::REP_INFO, &name);
    }
    if request.wants(proto::INFO_DESCRIPTION) {
        let text = format!("shorthorn volume {}", export.name);
        let description = proto::info_string(proto::INFO_DESCRIPTION, &text);
        proto::put_option_reply(out, option, proto::REP_INFO, &description);
    }
    proto::put_option_reply(out, option, proto::REP_ACK, &[]);
    Ok((option == proto::OPT_GO).then_some(Negotiated::Transmission))
}

struct InfoRequest<'a> {
    name: &'a [u8],
    infos: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name = data.get(4..4usize.checked_add(name_len)?)?;
        let rest = &data[4 + name_len..];
        let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
        let infos = &rest[2..];
        (infos.len() == count * 2).then_some(InfoRequest { name, infos })
    }

    fn wants(&self, info: u16) -> bool {
        self.infos
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "vol".into(),
            size: 1 << 20,
            transmission_flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH,
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

    /// Splits option replies into (option, type, data).
    fn replies(mut buf: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            assert_eq!(
                u64::from_be_bytes(buf[0..8].try_into().unwrap()),
                proto::OPTION_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(buf[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(buf[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
            out.push((opt, ty, buf[20..20 + len].to_vec()));
            buf = &buf[20 + len..];
        }
        out
    }

    #[test]
    fn go_answers_export_and_block_size_then_ack() {
        let mut out = BytesMut::new();
        let data = info_data(b"vol", &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME]);
        let r = answer_option(proto::OPT_GO, &data, &export(), false, &mut out).unwrap();
        assert_eq!(r, Some(Negotiated::Transmission));
        let replies = replies(&out);
        let types: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                proto::REP_INFO,
                proto::REP_INFO,
                proto::REP_INFO,
                proto::REP_ACK
            ]
        );
        assert_eq!(replies[0].2, proto::info_export(1 << 20, 5));
        assert_eq!(replies[2].2, proto::info_string(proto::INFO_NAME, "vol"));
    }

    #[test]
    fn info_does_not_end_haggling_and_default_export_matches() {
        let mut out = BytesMut::new();
        let r = answer_option(
            proto::OPT_INFO,
            &info_data(b"", &[]),
            &export(),
            false,
            &mut out,
        );
        assert_eq!(r.unwrap(), None);
        assert_eq!(replies(&out).last().unwrap().1, proto::REP_ACK);
    }

    #[test]
    fn unknown_export_and_malformed_info_are_refused() {
        let mut out = BytesMut::new();
        let r = answer_option(
            proto::OPT_GO,
            &info_data(b"nope", &[]),
            &export(),
            false,
            &mut out,
        );
        assert_eq!(r.unwrap(), None);
        assert_eq!(replies(&out)[0].1, proto::REP_ERR_UNKNOWN);

        for bad in [
            vec![],
            vec![0, 0, 0],
            vec![0xff, 0xff, 0xff, 0xff, 0, 0],
            {
                let mut d = info_data(b"vol", &[1]);
                d.pop();
                d
            },
            {
                let mut d = info_data(b"vol", &[]);
                d.push(0);
                d
            },
        ] {
            let mut out = BytesMut::new();
            let r = answer_option(proto::OPT_GO, &bad, &export(), false, &mut out);
            assert_eq!(r.unwrap(), None);
            assert_eq!(replies(&out)[0].1, proto::REP_ERR_INVALID, "{bad:?}");
        }
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut out = BytesMut::new();
        answer_option(proto::OPT_EXPORT_NAME, b"vol", &export(), false, &mut out).unwrap();
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut out = BytesMut::new();
        answer_option(proto::OPT_EXPORT_NAME, b"", &export(), true, &mut out).unwrap();
        assert_eq!(out.len(), 8 + 2);
        assert!(answer_option(proto::OPT_EXPORT_NAME, b"x", &export(), true, &mut out).is_err());
    }

    #[test]
    fn list_and_unknown_options() {
        let mut out = BytesMut::new();
        answer_option(proto::OPT_LIST, &[], &export(), false, &mut out).unwrap();
        let r = replies(&out);
        assert_eq!(r[0].1, proto::REP_SERVER);
        assert_eq!(r[0].2, [0, 0, 0, 3, b'v', b'o', b'l']);
        assert_eq!(r[1].1, proto::REP_ACK);

        for opt in [
            proto::OPT_STRUCTURED_REPLY,
            proto::OPT_STARTTLS,
            9,
            0xdead_beef,
        ] {
            let mut out = BytesMut::new();
            assert_eq!(
                answer_option(opt, b"xyz", &export(), false, &mut out).unwrap(),
                None
            );
            assert_eq!(replies(&out)[0].1, proto::REP_ERR_UNSUP);
        }
    }
}
