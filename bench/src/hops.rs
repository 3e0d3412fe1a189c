//! What one socket hop costs on this machine: the round trip of a 4 KiB
//! write's request and its small reply between two threads, over a unix
//! socket (the hop from an NBD client to its engine) and over TCP loopback
//! (the hop from an engine to a replica on another daemon).
//!
//! A queue-depth-1 IO waits for each hop it crosses in turn, so the raw
//! disk's latency plus these round trips is a floor no NBD-served volume
//! can beat here, however little its own code costs. On a virtual machine
//! a wake-up on another core can cost tens of microseconds, which puts that
//! floor well above the bare disk; the bench measures it in every round so
//! the latency rows can be read against it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::EngineMode;

/// A 4 KiB NBD write request: 28 bytes of header and the block.
const REQUEST: usize = 28 + 4096;
/// An NBD simple reply.
const REPLY: usize = 16;
/// Round trips made before timing starts (connection set-up, cold caches).
const WARM_UP: usize = 200;

/// Mean round trips measured in one round, in µs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundTrips {
    pub unix_us: f64,
    pub tcp_us: f64,
}

impl RoundTrips {
    /// Times round trips over a unix socket pair and over a TCP loopback
    /// connection, each for about `each`.
    pub fn measure(each: Duration) -> io::Result<RoundTrips> {
        let (a, b) = UnixStream::pair()?;
        let unix_us = ping_pong(a, b, each)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let tcp_us = ping_pong(client, server, each)?;
        Ok(RoundTrips { unix_us, tcp_us })
    }
}

/// Sends requests from `near` and answers them from `far` on a thread of
/// its own; returns the mean round trip in µs over about `each`.
fn ping_pong<S>(mut near: S, mut far: S, each: Duration) -> io::Result<f64>
where
    S: Read + Write + Send + 'static,
{
    let echo = std::thread::spawn(move || -> io::Result<()> {
        let mut request = vec![0u8; REQUEST];
        let reply = [0u8; REPLY];
        loop {
            match far.read_exact(&mut request) {
                Ok(()) => far.write_all(&reply)?,
                // The near end closed: done.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let request = vec![0x5a_u8; REQUEST];
    let mut reply = [0u8; REPLY];
    let mut once = || -> io::Result<()> {
        near.write_all(&request)?;
        near.read_exact(&mut reply)
    };
    let timed = (|| -> io::Result<f64> {
        for _ in 0..WARM_UP {
            once()?;
        }
        let start = Instant::now();
        let mut n = 0u32;
        while n == 0 || start.elapsed() < each {
            once()?;
            n += 1;
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    })();
    drop(near);
    let echoed = echo
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the echo thread panicked")));
    let mean = timed?;
    echoed?;
    Ok(mean)
}

/// The socket hops a queue-depth-1 IO on a shorthorn volume crosses:
/// always the NBD client's unix socket; a TCP connection as well when a
/// replica it must wait for is reached over one. A hosted engine reaches
/// the replica of its own daemon in memory, so its reads and a 1-replica
/// volume's writes cross no TCP hop; a 2-replica write waits for daemon 2.
pub fn hops(replicas: usize, writes: bool, engines: EngineMode) -> Hops {
    let tcp = match engines {
        EngineMode::Process => true,
        EngineMode::Hosted => writes && replicas > 1,
    };
    Hops { unix: true, tcp }
}

/// Which of the measured round trips an IO waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hops {
    pub unix: bool,
    pub tcp: bool,
}

impl Hops {
    /// The time these hops cost, from one round's measurement.
    pub fn cost_us(self, trips: &RoundTrips) -> f64 {
        let unix = if self.unix { trips.unix_us } else { 0.0 };
        let tcp = if self.tcp { trips.tcp_us } else { 0.0 };
        unix + tcp
    }

    /// The hops in words, for the goals table.
    pub fn describe(self) -> &'static str {
        match (self.unix, self.tcp) {
            (true, true) => "unix + TCP round trips",
            (true, false) => "unix round trip",
            (false, true) => "TCP round trip",
            (false, false) => "no hops",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_measured_over_both_sockets() {
        let t = RoundTrips::measure(Duration::from_millis(20)).unwrap();
        // Loose bounds: a real round trip, on any machine.
        for us in [t.unix_us, t.tcp_us] {
            assert!(us > 0.1 && us < 100_000.0, "{t:?}");
        }
    }

    #[test]
    fn a_hosted_two_replica_write_waits_for_both_sockets() {
        let hosted = EngineMode::Hosted;
        assert_eq!(
            hops(2, true, hosted),
            Hops {
                unix: true,
                tcp: true
            }
        );
        // Reads, and a single replica's writes, stay in the hosting daemon.
        assert_eq!(
            hops(2, false, hosted),
            Hops {
                unix: true,
                tcp: false
            }
        );
        assert_eq!(
            hops(1, true, hosted),
            Hops {
                unix: true,
                tcp: false
            }
        );
        // An engine of its own reaches every replica over TCP.
        let process = EngineMode::Process;
        assert_eq!(
            hops(1, false, process),
            Hops {
                unix: true,
                tcp: true
            }
        );
        let trips = RoundTrips {
            unix_us: 40.0,
            tcp_us: 55.0,
        };
        assert_eq!(hops(2, true, hosted).cost_us(&trips), 95.0);
        assert_eq!(hops(2, false, hosted).cost_us(&trips), 40.0);
    }
}
