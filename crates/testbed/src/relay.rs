//! A TCP relay on loopback that counts the bytes passing through it, put
//! between a client and the registry to measure what a pull downloads from
//! outside the system being measured.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Byte and connection counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes sent from the upstream server to clients.
    pub bytes_down: AtomicU64,
    /// Bytes sent from clients to the upstream server.
    pub bytes_up: AtomicU64,
    pub connections: AtomicU64,
}

/// How a relay shapes traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayOptions {
    /// Cap on the server-to-client throughput of each connection, in bytes
    /// per second, like an object store's per-connection limit.
    pub down_bytes_per_sec_per_connection: Option<u64>,
    /// Delay added to every request (each burst a client sends), like the
    /// round trip to a distant registry.
    pub request_latency: Option<Duration>,
}

/// Forwards every connection on `addr()` to `upstream`. Dropping it closes
/// the listener and all open connections.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    stats: Arc<RelayStats>,
    stopping: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_with(upstream, RelayOptions::default())
    }

    /// Like [`Relay::start`], shaping traffic as `options` say.
    pub fn start_with(upstream: SocketAddr, options: RelayOptions) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind relay")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stats, stopping, open) = (stats.clone(), stopping.clone(), open.clone());
            std::thread::spawn(move || {
                accept_loop(listener, upstream, options, &stats, &stopping, &open)
            })
        };
        Ok(Self {
            addr,
            stats,
            stopping,
            open,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, to use as a registry host in references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Bytes served by the upstream so far.
    pub fn bytes_down(&self) -> u64 {
        self.stats.bytes_down.load(Ordering::Relaxed)
    }

    /// Zeroes the counters.
    pub fn reset(&self) {
        self.stats.bytes_down.store(0, Ordering::Relaxed);
        self.stats.bytes_up.store(0, Ordering::Relaxed);
        self.stats.connections.store(0, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    options: RelayOptions,
    stats: &Arc<RelayStats>,
    stopping: &AtomicBool,
    open: &Mutex<Vec<TcpStream>>,
) {
    for client in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            open.push(c);
            open.push(s);
        }
        spawn_pipe(
            &client,
            &server,
            stats.clone(),
            |s| &s.bytes_up,
            Shaping {
                rate: None,
                delay: options.request_latency,
            },
        );
        spawn_pipe(
            &server,
            &client,
            stats.clone(),
            |s| &s.bytes_down,
            Shaping {
                rate: options.down_bytes_per_sec_per_connection,
                delay: None,
            },
        );
    }
}

/// What one direction of a connection does to the traffic.
#[derive(Debug, Clone, Copy)]
struct Shaping {
    /// Bytes per second.
    rate: Option<u64>,
    /// Wait before forwarding each read.
    delay: Option<Duration>,
}

/// Copies `from` → `to` on its own thread, counting into the counter
/// `pick` selects, and half-closes `to` at end of stream.
fn spawn_pipe(
    from: &TcpStream,
    to: &TcpStream,
    stats: Arc<RelayStats>,
    pick: fn(&RelayStats) -> &AtomicU64,
    Shaping { rate, delay }: Shaping,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        // With a rate cap, read in 16 KiB steps so pacing stays smooth.
        let mut buf = vec![0u8; if rate.is_some() { 16 * 1024 } else { 64 * 1024 }];
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            // Count before forwarding, so a peer that has received the
            // bytes always sees them counted.
            pick(&stats).fetch_add(n as u64, Ordering::Relaxed);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            if let Some(wait) = rate.and_then(|r| pacing_delay(sent, r, started.elapsed())) {
                std::thread::sleep(wait);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _: io::Result<()> = from.shutdown(Shutdown::Read);
    });
}

/// How long to wait so that `sent` bytes over `elapsed` do not exceed
/// `rate` bytes per second.
fn pacing_delay(sent: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
    due.checked_sub(elapsed).filter(|wait| !wait.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_waits_until_the_rate_allows() {
        let second = Duration::from_secs(1);
        assert_eq!(
            pacing_delay(1_000_000, 1_000_000, Duration::ZERO),
            Some(second)
        );
        assert_eq!(
            pacing_delay(500_000, 1_000_000, Duration::from_millis(100)),
            Some(Duration::from_millis(400))
        );
        assert_eq!(pacing_delay(500_000, 1_000_000, second), None);
    }

    #[test]
    fn relay_forwards_and_counts() {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let upstream = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            s.write_all(&[7u8; 1000]).unwrap();
            got
        });
        let relay = Relay::start(upstream).unwrap();
        let mut client = TcpStream::connect(relay.addr()).unwrap();
        client.write_all(b"hello").unwrap();
        let mut back = vec![0u8; 1000];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&echo.join().unwrap(), b"hello");
        assert!(back.iter().all(|b| *b == 7));
        assert_eq!(relay.bytes_down(), 1000);
        assert_eq!(relay.stats().bytes_up.load(Ordering::Relaxed), 5);
        assert_eq!(relay.stats().connections.load(Ordering::Relaxed), 1);
    }
}
