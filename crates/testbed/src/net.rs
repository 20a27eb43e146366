//! Loopback ports and readiness probes. Everything here talks to
//! 127.0.0.1 only.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A port on 127.0.0.1 that was free a moment ago. Another process may take
/// it before the caller binds it, so starters retry with a new port when
/// their daemon fails to bind.
pub fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends `GET path` over HTTP/1.0 and returns the status code, or `None`
/// when nothing answers yet.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    let line = std::str::from_utf8(&head).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// Sends `GET path` over HTTP/1.0 and returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read the answer to GET {path} from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {response:?}"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Polls `probe` every 50 ms until it returns `Ok(true)`, fails, or
/// `timeout` passes; the error names `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if probe()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{what} was not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
