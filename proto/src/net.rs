//! TCP settings every long-lived shorthorn connection uses: the replica
//! protocol's on both ends, and the engine's NBD clients.

/// Probes an idle connection, so one whose peer vanished without closing it
/// (its node lost power, its network went away) is closed after about 80 s
/// of silence instead of never: otherwise a dead engine would keep its
/// volume in use on a replica daemon, and dead NBD clients would use up an
/// engine's connection slots.
pub fn keep_alive(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level, name, value: libc::c_int| {
        // SAFETY: `fd` is an open socket for the call's duration, and the
        // option's value is a c_int that outlives it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    // First probe after 30 s of silence, then every 10 s; 5 unanswered
    // probes close the connection (80 s in all).
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5)
}
