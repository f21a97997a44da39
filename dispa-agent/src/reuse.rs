//! One listening socket per serving thread, in one `SO_REUSEPORT` group.
//!
//! With one socket shared by every serving thread, whichever thread wakes first takes a whole
//! burst of new connections, and a thread holding all of them caps the listener at one CPU
//! while the others idle (docs/BENCHMARKS.md, "Who waits for whom"). In a group the kernel
//! hashes each connection to one member's queue instead.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections per socket, as `TcpListener::bind` has it.
const BACKLOG: u32 = 1024;

/// Binds the first socket of a group at `addr`. A group admits any socket of the same user
/// that asks to join, so an address some other process already listens on is refused as a
/// plain bind would: a socket without `SO_REUSEPORT` is bound and dropped first.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    if addr.port() != 0 {
        let probe = socket(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
    }
    join(addr)
}

/// A socket of the group at `addr` (for a further serving thread, the first socket's local
/// address).
pub fn join(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket(addr)?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

fn socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_already_listened_on_is_refused() {
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = bind(plain.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn a_second_group_at_the_same_address_is_refused() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _joined = join(first.local_addr().unwrap()).unwrap();
        let err = bind(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn every_member_accepts_its_share() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let second = join(first.local_addr().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Connections are queued on the members as they complete; count what each holds.
        let (mut a, mut b) = (0, 0);
        for _ in 0..64 {
            tokio::select! {
                r = first.accept() => { r.unwrap(); a += 1; }
                r = second.accept() => { r.unwrap(); b += 1; }
            }
        }
        assert_eq!(a + b, 64);
        assert!(
            a > 0 && b > 0,
            "one member took every connection: {a} / {b}"
        );
    }
}
