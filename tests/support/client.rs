//! A small blocking HTTP/1.1 client over `std::net` with full control of the request-target
//! bytes (no URL normalisation), keep-alive, and streaming upload/download helpers that never
//! buffer whole bodies.

use super::pattern;
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio_rustls::rustls;

/// The rustls crypto provider used by the test TLS code (*ring*, the only one compiled in).
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read timeout used for every connection unless changed with [`Conn::set_read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Status code, reason phrase and header lines of a response.
pub type Head = (u16, String, Vec<(String, String)>);

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// All header lines in order (repeated names kept), names as received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    /// All values of a header (case-insensitive name).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parse the body as JSON, panicking with the response if that fails.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    /// The fake's echo: the body itself for successful requests, or `.echo` of a 401 body.
    pub fn echo(&self) -> Value {
        let v = self.json();
        if v.get("code").is_some() && v.get("echo").is_some() {
            v["echo"].clone()
        } else {
            v
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.host)
    }
}

pub fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Request body framing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    /// No body headers at all.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Framing {
    /// A buffered body's framing: `Content-Length` when there is a body or the method
    /// normally has one (so an empty POST says `Content-Length: 0`), else none.
    pub fn of_body(method: &str, body: &[u8]) -> Framing {
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            Framing::Length(body.len() as u64)
        } else {
            Framing::None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum RespFraming {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// One HTTP/1.1 connection (keep-alive capable).
pub struct Conn {
    stream: Box<dyn Stream>,
    host: String,
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    closed: bool,
    /// Bytes read from the stream so far (see [`Conn::bytes_received`]).
    received: u64,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        Conn::connect_with_timeout(addr, DEFAULT_READ_TIMEOUT)
    }

    /// Plain TCP connection whose reads/writes time out after `timeout`.
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        Conn::from_tcp(s, timeout)
    }

    /// A connected TCP stream (e.g. bound to a chosen source address) whose reads/writes time
    /// out after `timeout`; `Host:` is the peer address.
    pub fn from_tcp(s: TcpStream, timeout: Duration) -> io::Result<Conn> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let host = s.peer_addr()?.to_string();
        Ok(Conn::from_stream(Box::new(s), host))
    }

    /// TLS connection trusting only `ca_pem`, with SNI/verification name `server_name`.
    pub fn connect_tls(addr: SocketAddr, server_name: &str, ca_pem: &str) -> io::Result<Conn> {
        use rustls::pki_types::pem::PemObject;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(DEFAULT_READ_TIMEOUT))?;
        s.set_nodelay(true)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots
                .add(c.map_err(io::Error::other)?)
                .map_err(io::Error::other)?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(io::Error::other)?;
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(io::Error::other)?;
        let tls = rustls::StreamOwned::new(conn, s);
        Ok(Conn::from_stream(
            Box::new(tls),
            format!("{server_name}:{}", addr.port()),
        ))
    }

    fn from_stream(stream: Box<dyn Stream>, host: String) -> Conn {
        Conn {
            stream,
            host,
            rbuf: vec![0u8; 256 * 1024],
            rpos: 0,
            rend: 0,
            closed: false,
            received: 0,
        }
    }

    /// Plain HTTP over a Unix domain socket (`Host: localhost`), with the default timeouts.
    pub fn connect_unix(path: &std::path::Path) -> io::Result<Conn> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(DEFAULT_READ_TIMEOUT))?;
        s.set_write_timeout(Some(DEFAULT_READ_TIMEOUT))?;
        Ok(Conn::from_stream(Box::new(s), "localhost".to_string()))
    }

    /// Total bytes read from the server on this connection so far: unchanged across a failed
    /// request means no byte of a response arrived.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Whether the server closed (or asked to close) the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Write a request head. Adds `Host` unless given; adds body framing headers per `framing`
    /// unless the caller supplied Content-Length / Transfer-Encoding.
    pub fn write_head(
        &mut self,
        method: &str,
        target: &[u8],
        headers: &[(&str, &str)],
        framing: Framing,
    ) -> io::Result<()> {
        let mut head: Vec<u8> = Vec::with_capacity(256);
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(target);
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        if !has("host") {
            head.extend_from_slice(format!("Host: {}\r\n", self.host).as_bytes());
        }
        if !has("content-length") && !has("transfer-encoding") {
            match framing {
                Framing::None => {}
                Framing::Length(n) => {
                    head.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes())
                }
                Framing::Chunked => head.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            }
        }
        for (k, v) in headers {
            head.extend_from_slice(k.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(v.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        self.stream.write_all(&head)?;
        self.stream.flush()
    }

    pub fn write_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }

    /// Send a request with a buffered body and read the whole response.
    pub fn request(
        &mut self,
        method: &str,
        target: &[u8],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        self.write_head(method, target, headers, Framing::of_body(method, body))?;
        if !body.is_empty() {
            self.stream.write_all(body)?;
            self.stream.flush()?;
        }
        self.read_response(method)
    }

    /// Read a complete response (buffering its body).
    pub fn read_response(&mut self, method: &str) -> io::Result<Response> {
        let mut body = Vec::new();
        let (status, reason, headers) =
            self.read_response_streaming(method, &mut |d| body.extend_from_slice(d))?;
        Ok(Response {
            status,
            reason,
            headers,
            body,
        })
    }

    /// Read a response, passing body data to `sink` as it arrives.
    pub fn read_response_streaming(
        &mut self,
        method: &str,
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<Head> {
        let (status, reason, headers) = self.read_head()?;
        let framing = self.response_framing(method, status, &headers)?;
        if header_in(&headers, "connection")
            .map(|v| v.to_ascii_lowercase().contains("close"))
            .unwrap_or(false)
        {
            self.closed = true;
        }
        self.read_body(framing, sink)?;
        Ok((status, reason, headers))
    }

    /// Read status line and headers, skipping interim 1xx responses.
    pub fn read_head(&mut self) -> io::Result<Head> {
        loop {
            let (status, reason, headers) = self.read_one_head()?;
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            return Ok((status, reason, headers));
        }
    }

    /// Read one status line + headers, including interim (1xx) responses.
    pub fn read_one_head(&mut self) -> io::Result<Head> {
        let line = self.read_line()?;
        let line = String::from_utf8_lossy(&line).into_owned();
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line: {line:?}"),
            ));
        }
        let status: u16 = parts.next().unwrap_or("").parse().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad status: {line:?}"))
        })?;
        let reason = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let l = self.read_line()?;
            if l.is_empty() {
                break;
            }
            let l = String::from_utf8_lossy(&l).into_owned();
            let (k, v) = l.split_once(':').ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad header: {l:?}"))
            })?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        if version == "HTTP/1.0"
            && !header_in(&headers, "connection")
                .map(|v| v.eq_ignore_ascii_case("keep-alive"))
                .unwrap_or(false)
        {
            self.closed = true;
        }
        Ok((status, reason, headers))
    }

    fn response_framing(
        &self,
        method: &str,
        status: u16,
        headers: &[(String, String)],
    ) -> io::Result<RespFraming> {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&status)
            || status == 204
            || status == 304
        {
            return Ok(RespFraming::Empty);
        }
        if let Some(te) = header_in(headers, "transfer-encoding") {
            if te
                .rsplit(',')
                .next()
                .map(|t| t.trim().eq_ignore_ascii_case("chunked"))
                .unwrap_or(false)
            {
                return Ok(RespFraming::Chunked);
            }
            return Ok(RespFraming::Close);
        }
        if let Some(cl) = header_in(headers, "content-length") {
            let n = cl.trim().parse::<u64>().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad content-length {cl}"),
                )
            })?;
            return Ok(RespFraming::Length(n));
        }
        Ok(RespFraming::Close)
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        }
        if self.rend == self.rbuf.len() {
            // compact
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        let n = loop {
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // rustls reports a peer that closed without close_notify as UnexpectedEof
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break 0,
                Err(e) => return Err(e),
            }
        };
        self.rend += n;
        self.received += n as u64;
        Ok(n)
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            if let Some(i) = self.rbuf[self.rpos..self.rend]
                .iter()
                .position(|b| *b == b'\n')
            {
                out.extend_from_slice(&self.rbuf[self.rpos..self.rpos + i]);
                self.rpos += i + 1;
                if out.last() == Some(&b'\r') {
                    out.pop();
                }
                return Ok(out);
            }
            out.extend_from_slice(&self.rbuf[self.rpos..self.rend]);
            self.rpos = self.rend;
            if out.len() > 1 << 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                self.closed = true;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed while reading a line (got {:?})",
                        String::from_utf8_lossy(&out)
                    ),
                ));
            }
        }
    }

    /// Pass up to `n` bytes to sink; returns bytes delivered (< n only at EOF).
    fn read_n(&mut self, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
        let mut done = 0;
        while n > 0 {
            if self.rpos == self.rend && self.fill()? == 0 {
                return Ok(done);
            }
            let avail = (self.rend - self.rpos) as u64;
            let take = avail.min(n) as usize;
            sink(&self.rbuf[self.rpos..self.rpos + take]);
            self.rpos += take;
            n -= take as u64;
            done += take as u64;
        }
        Ok(done)
    }

    fn read_body(&mut self, framing: RespFraming, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        match framing {
            RespFraming::Empty => Ok(()),
            RespFraming::Length(n) => {
                let got = self.read_n(n, sink)?;
                if got < n {
                    self.closed = true;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body truncated: got {got} of {n} bytes"),
                    ));
                }
                Ok(())
            }
            RespFraming::Close => {
                self.read_n(u64::MAX, sink)?;
                self.closed = true;
                Ok(())
            }
            RespFraming::Chunked => {
                loop {
                    let line = self.read_line()?;
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let size_str = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size_str, 16).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad chunk size line {line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // trailers
                        loop {
                            if self.read_line()?.is_empty() {
                                break;
                            }
                        }
                        return Ok(());
                    }
                    let got = self.read_n(size, sink)?;
                    if got < size {
                        self.closed = true;
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "chunked body truncated",
                        ));
                    }
                    let crlf = self.read_line()?;
                    if !crlf.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "missing CRLF after chunk",
                        ));
                    }
                }
            }
        }
    }
}

/// One-shot request on a fresh connection (adds `Connection: close`). Panics on I/O errors.
pub fn send(
    addr: SocketAddr,
    method: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_send(addr, method, target, headers, body).unwrap_or_else(|e| {
        panic!(
            "{method} {} to {addr} failed: {e}",
            String::from_utf8_lossy(target)
        )
    })
}

/// One-shot request returning I/O errors (e.g. when the server closes without answering).
pub fn try_send(
    addr: SocketAddr,
    method: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut conn = Conn::connect(addr)?;
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if !h.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        h.push(("Connection", "close"));
    }
    conn.request(method, target, &h, body)
}

/// `GET` shorthand.
pub fn get(addr: SocketAddr, target: &str) -> Response {
    send(addr, "GET", target.as_bytes(), &[], b"")
}

/// Result of a streamed download.
#[derive(Clone, Debug)]
pub struct Download {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub len: u64,
    /// Whether the body matched the `i % 251` pattern.
    pub pattern_ok: bool,
    pub first_mismatch: Option<u64>,
    /// Transport error while reading the body, if any (the counts above are up to that point).
    pub error: Option<String>,
}

impl Download {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
}

/// Stream a GET response body through the pattern checker without buffering it.
pub fn download(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Download {
    download_with_progress(addr, target, headers, &mut |_| {})
}

/// Like [`download`], calling `progress(total_bytes_so_far)` after every read.
pub fn download_with_progress(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    progress: &mut dyn FnMut(u64),
) -> Download {
    let mut conn = Conn::connect(addr).expect("connect for download");
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("Connection", "close"));
    conn.write_head("GET", target.as_bytes(), &h, Framing::None)
        .expect("write download request");
    let (status, _reason, resp_headers) = conn.read_head().expect("read download response head");
    let framing = conn
        .response_framing("GET", status, &resp_headers)
        .expect("response framing");
    let mut checker = pattern::Checker::new();
    let res = conn.read_body(framing, &mut |d| {
        checker.update(d);
        progress(checker.len());
    });
    Download {
        status,
        headers: resp_headers,
        len: checker.len(),
        pattern_ok: checker.ok(),
        first_mismatch: checker.first_mismatch(),
        error: res.err().map(|e| e.to_string()),
    }
}

/// Start a slow download of `/queue/v1/__download/{len}?slow_ms={slow_ms}` through `addr` on a
/// thread; returns once `min_bytes` have arrived (panicking with `what` after 20 s otherwise),
/// with the number of bytes received so far.
pub fn slow_download(
    addr: SocketAddr,
    len: u64,
    slow_ms: u64,
    min_bytes: u64,
    what: &str,
) -> (std::thread::JoinHandle<Download>, Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel();
    let progress = Arc::new(AtomicU64::new(0));
    let p2 = progress.clone();
    let t = std::thread::spawn(move || {
        let mut signalled = false;
        download_with_progress(
            addr,
            &format!("/queue/v1/__download/{len}?slow_ms={slow_ms}"),
            &[],
            &mut |n| {
                p2.store(n, Ordering::SeqCst);
                if !signalled && n >= min_bytes {
                    signalled = true;
                    let _ = tx.send(());
                }
            },
        )
    });
    rx.recv_timeout(Duration::from_secs(20)).expect(what);
    (t, progress)
}

/// Upload `len` pattern bytes (generated on the fly) with Content-Length or chunked encoding,
/// then read the (small) response. If the server answers early and stops reading, the write
/// error is swallowed and the response is still returned if one arrives.
pub fn upload(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    len: u64,
    chunked: bool,
) -> io::Result<Response> {
    let mut conn = Conn::connect(addr)?;
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("Connection", "close"));
    let framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(len)
    };
    conn.write_head(method, target.as_bytes(), &h, framing)?;
    let write_result = (|| -> io::Result<()> {
        let mut buf = vec![0u8; pattern::CHUNK];
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            pattern::fill(&mut buf[..n], pos);
            if chunked {
                conn.write_raw(format!("{n:x}\r\n").as_bytes())?;
                conn.write_raw(&buf[..n])?;
                conn.write_raw(b"\r\n")?;
            } else {
                conn.write_raw(&buf[..n])?;
            }
            pos += n as u64;
        }
        if chunked {
            conn.write_raw(b"0\r\n\r\n")?;
        }
        conn.flush()
    })();
    match conn.read_response(method) {
        Ok(r) => Ok(r),
        Err(e) => Err(match write_result {
            Err(we) => io::Error::new(we.kind(), format!("write failed: {we}; then read: {e}")),
            Ok(()) => e,
        }),
    }
}
