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

/// Whether the peer of TCP socket `fd` has been taking our data lately:
/// bytes are on their way to it (sent, not yet acknowledged) and its last
/// acknowledgement arrived less than `within` ago. A peer behind a slow
/// link that is still receiving one large request says so, although it
/// cannot answer before the request is whole; a peer whose link is cut,
/// or whose receive buffer stays full (its process stopped), does not.
/// False when the kernel does not tell.
pub fn receiving(fd: std::os::fd::BorrowedFd<'_>, within: std::time::Duration) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket for the call's duration, and `info`
    // is writable for `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let has_ack_time = len as usize
        >= std::mem::offset_of!(libc::tcp_info, tcpi_last_ack_recv) + std::mem::size_of::<u32>();
    r == 0
        && has_ack_time
        && info.tcpi_unacked > 0
        && u128::from(info.tcpi_last_ack_recv) < within.as_millis()
}
