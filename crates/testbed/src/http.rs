//! Just enough HTTP/1.1 for the harness's own small servers (the fault
//! proxy and the token server): message heads, read and written.

use std::io::BufRead;

use anyhow::Result;

/// A parsed HTTP/1.1 message head: the first line and the header lines.
pub struct Head {
    pub first: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn read(reader: &mut impl BufRead) -> Result<Option<Head>> {
        let mut first = String::new();
        if reader.read_line(&mut first)? == 0 {
            return Ok(None);
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        Ok(Some(Head {
            first: first.trim_end().to_owned(),
            headers,
        }))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: String) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value));
    }

    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Writes a complete response with `body` and closes nothing.
pub fn respond(
    out: &mut impl std::io::Write,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<()> {
    let mut head = Head {
        first: format!("HTTP/1.1 {status} Pronto-Test"),
        headers: Vec::new(),
    };
    for (name, value) in headers {
        head.set(name, value.clone());
    }
    head.set("Content-Length", body.len().to_string());
    head.set("Connection", "close".into());
    out.write_all(&head.to_bytes())?;
    out.write_all(body)?;
    out.flush()?;
    Ok(())
}

/// Answers connections to `listener` one after another on a new thread
/// until `stopping` says so; dropping the server sets it and connects once
/// to wake the thread.
pub fn accept_each(
    listener: std::net::TcpListener,
    stopping: impl Fn() -> bool + Send + 'static,
    mut answer: impl FnMut(std::net::TcpStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stopping() {
                return;
            }
            if let Ok(stream) = stream {
                answer(stream);
            }
        }
    })
}
