//! Where the NBD server listens: a unix socket or a TCP address.
//!
//! Owns parsing of listen addresses, their NBD URIs, binding (including
//! removing a stale unix socket left by a crashed engine) and removing the
//! socket file again when the server stops. It never removes a path that is
//! not a socket, nor one another live server is listening on.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::{TcpListener, UnixListener};

/// A listen address for the NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdListen {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port at bind time.
    Tcp(SocketAddr),
}

/// A listen address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD listen address {input:?}: {reason} (want unix:/path/to.sock, HOST:PORT or tcp:HOST:PORT)")]
pub struct ParseListenError {
    input: String,
    reason: &'static str,
}

impl FromStr for NbdListen {
    type Err = ParseListenError;

    /// Accepts `unix:/path/to.sock`, `HOST:PORT` and `tcp:HOST:PORT`
    /// (`[::1]:10809` for IPv6). A host name is resolved once, here.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseListenError {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(NbdListen::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        if addr.is_empty() {
            return Err(err("empty address"));
        }
        if let Ok(sock) = addr.parse::<SocketAddr>() {
            return Ok(NbdListen::Tcp(sock));
        }
        if !addr.contains(':') {
            return Err(err("missing port"));
        }
        let mut resolved = addr
            .to_socket_addrs()
            .map_err(|_| err("cannot resolve host"))?;
        resolved
            .next()
            .map(NbdListen::Tcp)
            .ok_or_else(|| err("host has no address"))
    }
}

impl NbdListen {
    /// The address as `--nbd` takes it back (`unix:/path`, `tcp:HOST:PORT`).
    pub fn to_arg(&self) -> String {
        match self {
            NbdListen::Unix(path) => format!("unix:{}", path.display()),
            NbdListen::Tcp(addr) => format!("tcp:{addr}"),
        }
    }

    /// The NBD URI (as understood by libnbd, qemu and fio) of `export` on
    /// this address.
    pub fn uri(&self, export: &str) -> String {
        let export = percent_encode(export, false);
        match self {
            NbdListen::Unix(path) => format!(
                "nbd+unix:///{export}?socket={}",
                percent_encode(&path.to_string_lossy(), true)
            ),
            NbdListen::Tcp(addr) => {
                if export.is_empty() {
                    format!("nbd://{addr}")
                } else {
                    format!("nbd://{addr}/{export}")
                }
            }
        }
    }
}

impl fmt::Display for NbdListen {
    /// The URI of the default export: `nbd+unix:///?socket=/path` or
    /// `nbd://127.0.0.1:10809`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri(""))
    }
}

/// Escapes everything but RFC 3986 unreserved characters (and `/` when
/// `keep_slash`, for socket paths).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/');
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A bound listener of either kind.
pub(crate) enum Listener {
    Unix {
        listener: UnixListener,
        _socket_file: SocketFile,
    },
    Tcp(TcpListener),
}

/// An accepted connection, split into owned halves.
pub(crate) enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

impl Listener {
    /// Binds `listen`; returns the listener and the address actually bound
    /// (a TCP port 0 resolved to the port the kernel chose).
    pub(crate) async fn bind(listen: &NbdListen) -> io::Result<(Listener, NbdListen)> {
        match listen {
            NbdListen::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await?;
                let bound = listener.local_addr()?;
                Ok((Listener::Tcp(listener), NbdListen::Tcp(bound)))
            }
            NbdListen::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                let socket_file = SocketFile::new(path.clone())?;
                Ok((
                    Listener::Unix {
                        listener,
                        _socket_file: socket_file,
                    },
                    NbdListen::Unix(path.clone()),
                ))
            }
        }
    }

    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                Ok(Accepted::Unix(stream))
            }
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Replies are batched by the writer already; Nagle would only
                // delay the last reply of a burst. A client whose node
                // vanished gives its connection slot back within ~80 s.
                stream.set_nodelay(true)?;
                shorthorn_proto::net::keep_alive(&stream)?;
                Ok(Accepted::Tcp(stream, peer))
            }
        }
    }
}

/// Whether a socket file is at `path`: `false` when nothing is there, and an
/// `AlreadyExists` error when something other than a socket is (a file
/// named by mistake, never to be removed in a socket's place).
pub fn socket_file_at(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(true),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a socket file left behind by a server that is gone. Refuses (with
/// `AddrInUse`) when a server still answers on it, and (with `AlreadyExists`)
/// when the path is something other than a socket.
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if !socket_file_at(path)? {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is already listening on {}", path.display()),
        ));
    }
    tracing::info!(socket = %path.display(), "removing a stale socket file");
    std::fs::remove_file(path)
}

/// The socket file of a bound unix listener; removed when dropped, but only if
/// the path still names the socket we created.
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: PathBuf) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(SocketFile {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove NBD socket");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            "unix:/run/sh/vol.sock".parse::<NbdListen>().unwrap(),
            NbdListen::Unix("/run/sh/vol.sock".into())
        );
        assert_eq!(
            "127.0.0.1:10809".parse::<NbdListen>().unwrap(),
            NbdListen::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp:0.0.0.0:0".parse::<NbdListen>().unwrap(),
            NbdListen::Tcp("0.0.0.0:0".parse().unwrap())
        );
        assert_eq!(
            "[::1]:10809".parse::<NbdListen>().unwrap(),
            NbdListen::Tcp("[::1]:10809".parse().unwrap())
        );
        match "localhost:10809".parse::<NbdListen>().unwrap() {
            NbdListen::Tcp(addr) => {
                assert!(addr.ip().is_loopback());
                assert_eq!(addr.port(), 10809);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn to_arg_parses_back_to_the_same_address() {
        for arg in ["unix:/run/sh/vol.sock", "127.0.0.1:10809", "[::1]:0"] {
            let listen: NbdListen = arg.parse().unwrap();
            assert_eq!(listen.to_arg().parse::<NbdListen>().unwrap(), listen);
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "unix:",
            "tcp:",
            "127.0.0.1",
            "tcp:host-without-port",
            "1.2.3.4:99999",
        ] {
            assert!(bad.parse::<NbdListen>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn displays_nbd_uris() {
        let unix = NbdListen::Unix("/tmp/a b/vol.sock".into());
        assert_eq!(unix.to_string(), "nbd+unix:///?socket=/tmp/a%20b/vol.sock");
        assert_eq!(
            unix.uri("pvc-1"),
            "nbd+unix:///pvc-1?socket=/tmp/a%20b/vol.sock"
        );
        let tcp = NbdListen::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(tcp.to_string(), "nbd://127.0.0.1:10809");
        assert_eq!(tcp.uri("vol/1"), "nbd://127.0.0.1:10809/vol%2F1");
        let v6 = NbdListen::Tcp("[::1]:10809".parse().unwrap());
        assert_eq!(v6.to_string(), "nbd://[::1]:10809");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.sock");
        // A listener that went away without cleaning up leaves its file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, bound) = Listener::bind(&NbdListen::Unix(path.clone()))
            .await
            .unwrap();
        assert_eq!(bound, NbdListen::Unix(path.clone()));
        // A second server on the same live socket is refused.
        let second = Listener::bind(&NbdListen::Unix(path.clone())).await;
        assert_eq!(second.err().unwrap().kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn never_removes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, b"data").unwrap();
        let res = Listener::bind(&NbdListen::Unix(path.clone())).await;
        assert_eq!(res.err().unwrap().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
