//! An HTTP proxy on loopback that forwards requests to a registry and
//! injects faults into chosen responses: connection resets, error
//! statuses, throttling, truncated or corrupted bodies, wrong
//! `Content-Range`, stalls and redirects. It records every request so tests
//! can see what the client sent (ranges, `Authorization`).
//!
//! Each connection carries one request and is closed after the response
//! (`Connection: close`), which keeps the proxy simple and lets faults end
//! a response mid-body.

use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::http::Head;

/// What to do to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering, with a TCP reset.
    Reset,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer 429 with `Retry-After: <seconds>`.
    Throttle { retry_after_secs: u64 },
    /// Forward the response headers and half the body, then close.
    Truncate,
    /// Shift the start of `Content-Range` by one byte.
    WrongContentRange,
    /// Forward the headers and half the body, then go silent for this long.
    Stall(Duration),
    /// Flip one byte in the middle of the body.
    Corrupt,
    /// Answer `307` with `Location: <base><original path>`.
    Redirect(String),
    /// Drop the `Range` header: the registry answers `200` with the whole
    /// blob, as some CDNs in front of registries do.
    IgnoreRange,
    /// Read the request, answer nothing for this long, then close.
    Silent(Duration),
    /// Like `IgnoreRange`, but send only the first half of the blob, then
    /// go silent for this long: only a reader that stops at its range
    /// gets its bytes.
    IgnoreRangeThenStall(Duration),
}

/// A request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    /// The fault injected into its response, if any.
    pub fault: Option<Fault>,
}

#[derive(Debug)]
struct Rule {
    method: Option<String>,
    path_contains: String,
    /// Matching requests let through before the fault applies.
    skip: usize,
    remaining: usize,
    fault: Fault,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<SeenRequest>>,
    stopping: AtomicBool,
}

/// A running fault-injecting proxy. Dropping it stops accepting.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind the fault proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if shared.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(client, upstream, &shared);
                    });
                }
            })
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, to use as the registry host in references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Injects `fault` into the next `times` requests whose path contains
    /// `path_contains` (any method).
    pub fn inject(&self, path_contains: &str, times: usize, fault: Fault) {
        self.inject_for(None, path_contains, times, fault);
    }

    /// Like [`FaultProxy::inject`], only for requests with `method`.
    pub fn inject_for(
        &self,
        method: Option<&str>,
        path_contains: &str,
        times: usize,
        fault: Fault,
    ) {
        lock(&self.shared.rules).push(Rule {
            method: method.map(str::to_owned),
            path_contains: path_contains.to_owned(),
            skip: 0,
            remaining: times,
            fault,
        });
    }

    /// Lets the next `skip` requests with `method` whose path contains
    /// `path_contains` through, then injects `fault` into `times` more.
    pub fn inject_after(
        &self,
        method: &str,
        path_contains: &str,
        skip: usize,
        times: usize,
        fault: Fault,
    ) {
        lock(&self.shared.rules).push(Rule {
            method: Some(method.to_owned()),
            path_contains: path_contains.to_owned(),
            skip,
            remaining: times,
            fault,
        });
    }

    /// Removes all pending faults.
    pub fn clear(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(client: TcpStream, upstream: SocketAddr, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(mut request) = Head::read(&mut reader)? else {
        return Ok(());
    };
    let length: usize = request
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut parts = request.first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let fault = take_fault(shared, &method, &path);
    lock(&shared.seen).push(SeenRequest {
        method: method.clone(),
        path: path.clone(),
        range: request.get("range").map(str::to_owned),
        authorization: request.get("authorization").map(str::to_owned),
        fault: fault.clone(),
    });
    let mut client = client;
    match &fault {
        Some(Fault::Reset) => {
            // SO_LINGER with a zero timeout turns close() into a reset.
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &linger)?;
            return Ok(());
        }
        Some(Fault::Status(code)) => return answer(&mut client, *code, &[]),
        Some(Fault::Throttle { retry_after_secs }) => {
            return answer(
                &mut client,
                429,
                &[("Retry-After", retry_after_secs.to_string())],
            );
        }
        Some(Fault::Redirect(base)) => {
            return answer(&mut client, 307, &[("Location", format!("{base}{path}"))]);
        }
        Some(Fault::Silent(pause)) => {
            std::thread::sleep(*pause);
            return Ok(());
        }
        _ => {}
    }

    request.set("Connection", "close".into());
    if matches!(
        fault,
        Some(Fault::IgnoreRange | Fault::IgnoreRangeThenStall(_))
    ) {
        request.remove("range");
    }
    let mut server = TcpStream::connect(upstream).context("connect upstream")?;
    server.write_all(&request.to_bytes())?;
    server.write_all(&body)?;
    let mut server_reader = BufReader::new(server);
    let Some(mut response) = Head::read(&mut server_reader)? else {
        bail!("upstream closed without answering");
    };
    let mut response_body = Vec::new();
    server_reader.read_to_end(&mut response_body)?;
    response.set("Connection", "close".into());

    match fault {
        Some(Fault::Truncate) => {
            client.write_all(&response.to_bytes())?;
            client.write_all(&response_body[..response_body.len() / 2])?;
        }
        Some(Fault::Stall(pause) | Fault::IgnoreRangeThenStall(pause)) => {
            client.write_all(&response.to_bytes())?;
            client.write_all(&response_body[..response_body.len() / 2])?;
            client.flush()?;
            std::thread::sleep(pause);
        }
        Some(Fault::WrongContentRange) => {
            if let Some(shifted) = response.get("content-range").and_then(shift_content_range) {
                response.set("Content-Range", shifted);
            }
            client.write_all(&response.to_bytes())?;
            client.write_all(&response_body)?;
        }
        Some(Fault::Corrupt) => {
            if !response_body.is_empty() {
                let middle = response_body.len() / 2;
                response_body[middle] ^= 0xff;
            }
            client.write_all(&response.to_bytes())?;
            client.write_all(&response_body)?;
        }
        _ => {
            client.write_all(&response.to_bytes())?;
            client.write_all(&response_body)?;
        }
    }
    client.flush()?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

fn take_fault(shared: &Shared, method: &str, path: &str) -> Option<Fault> {
    let mut rules = lock(&shared.rules);
    let rule = rules.iter_mut().find(|r| {
        r.remaining > 0
            && path.contains(&r.path_contains)
            && r.method.as_deref().is_none_or(|m| m == method)
    })?;
    if rule.skip > 0 {
        rule.skip -= 1;
        return None;
    }
    rule.remaining -= 1;
    Some(rule.fault.clone())
}

fn answer(client: &mut TcpStream, status: u16, headers: &[(&str, String)]) -> Result<()> {
    crate::http::respond(client, status, headers, &[])
}

/// `bytes 10-19/100` → `bytes 11-20/100`.
fn shift_content_range(value: &str) -> Option<String> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = end.parse().ok()?;
    Some(format!("bytes {}-{}/{total}", start + 1, end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_shift() {
        assert_eq!(
            shift_content_range("bytes 10-19/100").as_deref(),
            Some("bytes 11-20/100")
        );
        assert_eq!(shift_content_range("nonsense"), None);
    }

    #[test]
    fn forwards_and_injects() {
        // An upstream that answers every connection with a fixed response.
        let upstream = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in upstream.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let _ = Head::read(&mut reader).unwrap();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
                    .unwrap();
            }
        });
        let proxy = FaultProxy::start(upstream_addr).unwrap();
        proxy.inject("/fail", 1, Fault::Status(503));
        let get = |path: &str| {
            let mut s = TcpStream::connect(proxy.addr()).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(get("/fail").starts_with("HTTP/1.1 503"));
        let ok = get("/fail");
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("body"),
            "{ok}"
        );
        let seen = proxy.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].fault, Some(Fault::Status(503)));
        assert_eq!(seen[1].range.as_deref(), Some("bytes=0-1"));
    }
}
