//! A corpus of hostile requests sent as raw bytes to the real binary (each on its own TCP
//! connection) in front of the fake Taskcluster upstream: malformed request lines, absolute-
//! and authority-form targets, CONNECT, CR/LF/NUL injection, non-UTF-8 bytes, oversized and
//! numerous headers, conflicting body framing and CL.TE / TE.CL smuggling, HTTP/0.9, the
//! HTTP/2 preface, slowloris-style partial requests.
//!
//! Exact status codes are Pingora's business; what is asserted is:
//! - the proxy never crashes and still signs a normal request correctly afterwards;
//! - requests that must not be forwarded (class `Reject`) get a 4xx/5xx or a close and never
//!   reach the upstream; a `NoSuccess` request may reach it but never yields a 2xx;
//! - nothing ever reaches `evil.example` (a canary listener that `--connect-to` points at);
//! - no smuggled request (marked `SMUGGLED` / `X-Case: <case>-smuggled`) and no header injected
//!   through the request-target ever reaches the upstream, in any form;
//! - any 2xx is the upstream's answer to a request the proxy signed and the fake verified.
//!
//! Every request carries `X-Case: <name>` where its head can carry one, so the fake's log says
//! which case reached it; an untagged request at the upstream is a failure.

mod support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{assert_auth_ok, fake, proxy_for, send};

/// What may happen to a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// 4xx/5xx or a close, and the upstream never sees it.
    Reject,
    /// Never a 2xx; the upstream may see the head (bodies stream) but must not answer it 2xx.
    NoSuccess,
    /// May be forwarded (the bytes are odd but legitimate); a 2xx must be a verified echo.
    Lenient,
    /// Conflicting framing hiding a second request: the outer request may be answered (RFC
    /// 9112 §6.1 lets a server use Transfer-Encoding alone), but then the connection must be
    /// closed — at most one final response — and the hidden request never reaches upstream.
    Smuggle,
}

enum Step {
    Send(Vec<u8>),
    Sleep(u64),
    /// Close our side without waiting for an answer.
    Close,
}

struct Case {
    name: &'static str,
    class: Class,
    steps: Vec<Step>,
}

/// `@TAG@` in the bytes becomes the case name.
fn case(name: &'static str, class: Class, bytes: impl AsRef<[u8]>) -> Case {
    Case {
        name,
        class,
        steps: vec![Step::Send(tag(bytes.as_ref(), name))],
    }
}

fn tag(bytes: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"@TAG@") {
            out.extend_from_slice(name.as_bytes());
            i += 5;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A pipelined request that must never reach the upstream.
const SMUGGLED: &str =
    "GET /queue/v1/SMUGGLED HTTP/1.1\r\nHost: proxy\r\nX-Case: @TAG@-smuggled\r\n\r\n";

/// The head after the request line: `Host`, the case tag, then `extra` header lines.
const HEAD: &[u8] = b"\r\nHost: proxy\r\nX-Case: @TAG@\r\n";

/// `<request_line>` + tagged head + `\r\n`.
fn line(request_line: impl AsRef<[u8]>) -> Vec<u8> {
    [request_line.as_ref(), HEAD, b"\r\n"].concat()
}

/// `GET <target> HTTP/1.1` + tagged head.
fn get(target: impl AsRef<[u8]>) -> Vec<u8> {
    line([b"GET ", target.as_ref(), b" HTTP/1.1"].concat())
}

/// `GET /queue/v1/x` with extra header lines (each ending in CRLF).
fn headers(extra: impl AsRef<[u8]>) -> Vec<u8> {
    [b"GET /queue/v1/x HTTP/1.1", HEAD, extra.as_ref(), b"\r\n"].concat()
}

/// `POST /queue/v1/x` with extra header lines, then `body`.
fn post(extra: impl AsRef<[u8]>, body: impl AsRef<[u8]>) -> Vec<u8> {
    [
        b"POST /queue/v1/x HTTP/1.1",
        HEAD,
        extra.as_ref(),
        b"\r\n",
        body.as_ref(),
    ]
    .concat()
}

fn corpus(fake_port: u16) -> Vec<Case> {
    use Class::*;
    let upstream = format!("127.0.0.1:{fake_port}");
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut c = vec![
        // --- request lines ---------------------------------------------------------------
        case(
            "blank-lines-then-garbage",
            Reject,
            "\r\n\r\nGARBAGE\r\n\r\n",
        ),
        case("missing-version", Reject, line("GET /queue/v1/x")),
        case("http-0.9", Reject, "GET /queue/v1/x\r\n"),
        case("http-0.9-then-blank", Reject, "GET /queue/v1/x\r\n\r\n"),
        case("version-1.2", Reject, line("GET /queue/v1/x HTTP/1.2")),
        case("version-9.9", Reject, line("GET /queue/v1/x HTTP/9.9")),
        case(
            "version-lowercase",
            Reject,
            line("GET /queue/v1/x http/1.1"),
        ),
        case("version-garbage", Reject, line("GET /queue/v1/x HTTP/1.1x")),
        case(
            "tabs-in-request-line",
            Reject,
            line("GET\t/queue/v1/x\tHTTP/1.1"),
        ),
        case("no-target", Reject, line("GET HTTP/1.1")),
        case("method-only", Reject, "GET\r\n\r\n"),
        case("leading-space", Reject, line(" GET /queue/v1/x HTTP/1.1")),
        case(
            "binary-garbage",
            Reject,
            (0u8..=255).cycle().take(600).collect::<Vec<u8>>(),
        ),
        case(
            "tls-client-hello-on-plain-port",
            Reject,
            [
                &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
                &[7u8; 32],
                b"\x00\x00\x02\x13\x01\x01\x00",
            ]
            .concat(),
        ),
        case(
            "http2-preface",
            Reject,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ),
        // --- methods ---------------------------------------------------------------------
        case(
            "absurd-method-1000-chars",
            Lenient,
            line(format!("{} /queue/v1/x HTTP/1.1", "X".repeat(1000))),
        ),
        case(
            "method-with-delimiter",
            Reject,
            line("G@T /queue/v1/x HTTP/1.1"),
        ),
        case("method-with-nul", Reject, line("G\0T /queue/v1/x HTTP/1.1")),
        case(
            "method-non-ascii",
            Reject,
            line(b"G\xc9T /queue/v1/x HTTP/1.1"),
        ),
        case(
            "method-lowercase",
            Lenient,
            line("get /queue/v1/x HTTP/1.1"),
        ),
        case(
            "connect-authority",
            Reject,
            line("CONNECT evil.example:443 HTTP/1.1"),
        ),
        case(
            "connect-upstream-authority",
            Reject,
            line(format!("CONNECT {upstream} HTTP/1.1")),
        ),
        case(
            "connect-absolute",
            Reject,
            line("CONNECT http://evil.example/ HTTP/1.1"),
        ),
        case("options-asterisk", Reject, line("OPTIONS * HTTP/1.1")),
        case("get-asterisk", Reject, get("*")),
        // --- absolute-form, authority-form and other non-origin-form targets -------------
        case("absolute-form-evil", Reject, get("http://evil.example/")),
        case(
            "absolute-form-evil-https-api-path",
            Reject,
            get("https://evil.example/api/queue/v1/x"),
        ),
        case(
            "absolute-form-evil-shortcut-path",
            Reject,
            get("http://evil.example/queue/v1/x"),
        ),
        case(
            "absolute-form-upstream",
            Reject,
            get(format!("http://{upstream}/api/queue/v1/x")),
        ),
        case("authority-form-get", Reject, get("evil.example:443")),
        case("target-without-slash-host", Reject, get("evil.example/x")),
        case("target-without-slash-service", Reject, get("queue/v1/x")),
        case("query-only-target", Reject, get("?x=1")),
        case("double-slash-host", Reject, get("//evil.example/x")),
        case("hostname-with-port", Reject, get("/evil.example:443/x")),
        case(
            "hostname-with-userinfo",
            Reject,
            get("/user@evil.example/x"),
        ),
        case("hostname-encoded-slash", Reject, get("/evil.example%2Fx/y")),
        case("hostname-backslash", Reject, get("/evil.example\\x/y")),
        // --- odd but legitimate targets: forwarded byte for byte and signed -------------
        case(
            "invalid-percent-encoding",
            Lenient,
            get("/queue/v1/%zz%%/%/%4"),
        ),
        case(
            "percent-encoded-crlf",
            Lenient,
            get("/queue/v1/x%0d%0aX-Injected-Path:%20yes"),
        ),
        case(
            "percent-encoded-crlf-in-query",
            Lenient,
            get("/queue/v1/x?a=%0D%0AX-Injected-Path:%20yes"),
        ),
        case("dot-segments", Lenient, get("/queue/v1/../../../admin")),
        case("utf8-in-path", Lenient, get(b"/queue/v1/caf\xc3\xa9")),
        case(
            "invalid-utf8-in-path",
            Lenient,
            get(b"/queue/v1/\xff\xfe\x80"),
        ),
        case("fragment-in-target", Lenient, get("/queue/v1/x#frag")),
        // --- CR / LF / NUL / SP / DEL in the request-target: rejected, or (Pingora's
        // choice) percent-encoded and signed as encoded; never a header upstream ---------
        case(
            "raw-cr-in-path",
            Lenient,
            get("/queue/v1/x\rX-Injected-Path: yes"),
        ),
        case(
            "raw-lf-in-path",
            Reject,
            get("/queue/v1/x\nX-Injected-Path: yes"),
        ),
        case(
            "raw-crlf-in-path",
            Reject,
            get("/queue/v1/x\r\nX-Injected-Path: yes"),
        ),
        case(
            "raw-crlf-in-query",
            Reject,
            get("/queue/v1/x?a=1\r\nX-Injected-Path: yes"),
        ),
        case("nul-in-path", Lenient, get("/queue/v1/x\0X-Injected-Path")),
        case(
            "space-in-path",
            Lenient,
            get("/queue/v1/x X-Injected-Path:"),
        ),
        case("del-in-path", Lenient, get("/queue/v1/x\x7fy")),
        // --- headers -------------------------------------------------------------------------
        case(
            "header-name-with-space",
            Reject,
            headers("Bad Header: x\r\n"),
        ),
        case("space-before-colon", Reject, headers("X-Foo : x\r\n")),
        case("header-without-colon", Reject, headers("NoColonHere\r\n")),
        case(
            "obs-fold",
            Reject,
            headers("X-Foo: a\r\n  X-Injected-Path: yes\r\n"),
        ),
        case("nul-in-header-value", Reject, headers("X-Foo: a\0b\r\n")),
        case(
            "bare-cr-in-header-value",
            Reject,
            headers("X-Foo: a\rX-Injected-Path: yes\r\n"),
        ),
        case("non-utf8-header-name", Reject, headers(b"X-\xff: a\r\n")),
        case(
            "non-utf8-header-value",
            Lenient,
            headers(b"X-Foo: caf\xe9 \xff\r\n"),
        ),
        case(
            "bare-lf-line-endings",
            Lenient,
            "GET /queue/v1/x HTTP/1.1\nHost: proxy\nX-Case: @TAG@\n\n",
        ),
        case(
            "no-host-header",
            Lenient,
            "GET /queue/v1/x HTTP/1.1\r\nX-Case: @TAG@\r\n\r\n",
        ),
        case(
            "two-host-headers",
            Lenient,
            headers("Host: evil.example\r\n"),
        ),
        case(
            "forwarded-headers",
            Lenient,
            headers(
                "X-Forwarded-Port: 1\r\nX-Forwarded-Proto: gopher\r\n\
                 X-Forwarded-Host: evil.example\r\nForwarded: host=evil.example\r\n",
            ),
        ),
        case(
            "task-authorization-headers",
            Lenient,
            headers("Authorization: Hawk id=\"evil\"\r\nAuthorization: Basic Zm9vOmJhcg==\r\n"),
        ),
        case(
            "connection-names-authorization",
            Lenient,
            headers("Connection: Authorization, Host\r\n"),
        ),
        case(
            "h2c-upgrade",
            Lenient,
            headers(
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                 HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
            ),
        ),
        case(
            "very-long-path-100k",
            Lenient,
            get(format!("/queue/v1/{}", "a".repeat(100 * 1024))),
        ),
        case(
            "very-long-query-100k",
            Lenient,
            get(format!("/queue/v1/x?q={}", "%41".repeat(34 * 1024))),
        ),
        case(
            "very-many-headers-10000",
            Reject,
            headers(
                (0..10_000)
                    .map(|i| format!("X-H-{i}: v\r\n"))
                    .collect::<String>(),
            ),
        ),
        case(
            "huge-header-1mib",
            Reject,
            headers(format!("X-Big: {}\r\n", "b".repeat(1024 * 1024))),
        ),
        case(
            "huge-header-name-64k",
            Reject,
            headers(format!("{}: v\r\n", "N".repeat(64 * 1024))),
        ),
        // --- body framing -----------------------------------------------------------------
        case(
            "duplicate-content-length-different",
            Reject,
            post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        ),
        case(
            "content-length-list",
            Reject,
            post("Content-Length: 5, 6\r\n", "hello!"),
        ),
        case(
            "content-length-negative",
            Reject,
            post("Content-Length: -1\r\n", "hello"),
        ),
        case(
            "content-length-overflow",
            Reject,
            post("Content-Length: 99999999999999999999999999\r\n", "hello"),
        ),
        case(
            "content-length-plus",
            Reject,
            post("Content-Length: +5\r\n", "hello"),
        ),
        case(
            "content-length-hex",
            Reject,
            post("Content-Length: 0x5\r\n", "hello"),
        ),
        case(
            "content-length-empty",
            Reject,
            post("Content-Length: \r\n", "hello"),
        ),
        case(
            "content-length-huge-then-silence",
            NoSuccess,
            post("Content-Length: 1000000000000\r\n", "only a few bytes"),
        ),
        case(
            "chunked-bad-size",
            NoSuccess,
            post(chunked, "zz\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunked-size-overflow",
            NoSuccess,
            post(chunked, "ffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunked-negative-size",
            NoSuccess,
            post(chunked, "-5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunked-missing-crlf-after-data",
            NoSuccess,
            post(chunked, "5\r\nhelloXX0\r\n\r\n"),
        ),
        case(
            "chunked-nul-extension",
            Lenient,
            post(chunked, "5;a\0b\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunked-trailer-injection",
            Lenient,
            post(chunked, "5\r\nhello\r\n0\r\nX-Injected-Path: yes\r\n\r\n"),
        ),
        case(
            "expect-continue-huge-then-silence",
            NoSuccess,
            headers("Expect: 100-continue\r\nContent-Length: 10000000\r\n"),
        ),
        // --- request smuggling: a second request hidden behind conflicting framing ---------
        smuggle_cl_te("smuggle-cl-te", "Transfer-Encoding: chunked"),
        smuggle_cl_te("smuggle-cl-te-xchunked", "Transfer-Encoding: xchunked"),
        smuggle_cl_te(
            "smuggle-cl-te-space-before-colon",
            "Transfer-Encoding : chunked",
        ),
        smuggle_cl_te("smuggle-cl-te-tab", "Transfer-Encoding:\tchunked"),
        smuggle_cl_te("smuggle-cl-te-list", "Transfer-Encoding: chunked, identity"),
        smuggle_cl_te(
            "smuggle-cl-te-identity-chunked",
            "Transfer-Encoding: identity, chunked",
        ),
        smuggle_cl_te(
            "smuggle-cl-te-two-headers",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        ),
        smuggle_cl_te("smuggle-cl-te-uppercase", "Transfer-Encoding: CHUNKED"),
        smuggle_cl_te("smuggle-cl-te-obs-fold", "Transfer-Encoding:\r\n chunked"),
        smuggle_te_cl("smuggle-te-cl"),
        case(
            "smuggle-te-http10",
            Smuggle,
            [
                &b"POST /queue/v1/x HTTP/1.0"[..],
                HEAD,
                chunked.as_bytes(),
                b"\r\n0\r\n\r\n",
                smuggled("smuggle-te-http10").as_bytes(),
            ]
            .concat(),
        ),
        case("smuggle-double-content-length", Smuggle, {
            let body = format!("0\r\n\r\n{}", smuggled("smuggle-double-content-length"));
            post(
                format!("Content-Length: 0\r\nContent-Length: {}\r\n", body.len()),
                body,
            )
        }),
        case(
            "smuggle-chunk-size-too-small",
            Smuggle,
            post(
                chunked,
                format!(
                    "2\r\nhello\r\n0\r\n\r\n{}",
                    smuggled("smuggle-chunk-size-too-small")
                ),
            ),
        ),
    ];
    // --- slow and partial requests -----------------------------------------------------
    let slow = |name: &'static str, class, head: &[u8], pause: u64| Case {
        name,
        class,
        steps: vec![Step::Send(tag(head, name)), Step::Sleep(pause), Step::Close],
    };
    c.push(slow(
        "slowloris-partial-then-close",
        Reject,
        b"GET /queue/v1/x HTTP/1.1\r\nHost: proxy\r\nX-Case: @TAG@\r\nX-Slow",
        1500,
    ));
    c.push(slow(
        "partial-body-then-close",
        NoSuccess,
        &post("Content-Length: 100\r\n", "abc"),
        300,
    ));
    let trickle = tag(
        b"GET /queue/v1/x HTTP/1.1\r\nHost: proxy\r\nX-Case: @TAG@\r\nX-A: ",
        "slowloris-trickle-then-close",
    );
    c.push(Case {
        name: "slowloris-trickle-then-close",
        class: Reject,
        steps: trickle
            .iter()
            .flat_map(|&b| [Step::Send(vec![b]), Step::Sleep(15)])
            .chain([Step::Close])
            .collect(),
    });
    c.push(Case {
        name: "connect-and-close-silently",
        class: Reject,
        steps: vec![Step::Close],
    });
    c
}

/// The smuggled request, tagged for `name`.
fn smuggled(name: &str) -> String {
    SMUGGLED.replace("@TAG@", name)
}

/// `Content-Length` covering a chunked terminator plus a smuggled request: a front end using
/// the length and a back end using chunked framing (or vice versa) would disagree.
fn smuggle_cl_te(name: &'static str, te: &str) -> Case {
    let body = format!("0\r\n\r\n{}", smuggled(name));
    let framing = format!("Content-Length: {}\r\n{te}\r\n", body.len());
    case(name, Class::Smuggle, post(framing, body))
}

/// Chunked framing whose one chunk is a smuggled request, with a short `Content-Length`.
fn smuggle_te_cl(name: &'static str) -> Case {
    let chunk = format!("G{}", smuggled(name));
    let body = format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    let framing = "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n";
    case(name, Class::Smuggle, post(framing, body))
}

/// One parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Outcome {
    responses: Vec<Resp>,
    /// Bytes after the last parsable response.
    unparsed: usize,
    write_error: Option<String>,
    /// The proxy closed (EOF or reset) rather than us timing out.
    closed_by_peer: bool,
}

/// Sends the steps on a fresh connection, then reads until the proxy closes, 1.5 s pass
/// without data, or 10 s in all.
fn run(addr: SocketAddr, steps: &[Step], patient: bool) -> Outcome {
    let mut out = Outcome::default();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut closed = false;
    for step in steps {
        match step {
            Step::Send(bytes) => {
                for part in bytes.chunks(64 * 1024) {
                    if let Err(e) = s.write_all(part) {
                        out.write_error = Some(e.to_string());
                        break;
                    }
                    // Keep reading so a proxy answering early is not blocked by our writes.
                    drain(&mut s, &mut buf, &mut closed);
                }
            }
            Step::Sleep(ms) => thread::sleep(Duration::from_millis(*ms)),
            Step::Close => {
                let _ = s.shutdown(Shutdown::Both);
                closed = true;
            }
        }
        if out.write_error.is_some() {
            break;
        }
    }
    // Wait for the proxy to answer or close: 1.5 s of silence ends the wait, or 300 ms once a
    // final response is in (unless `patient`, where a second response must get its chance).
    let start = Instant::now();
    let mut last_data = Instant::now();
    while !closed && start.elapsed() < Duration::from_secs(10) {
        let before = buf.len();
        drain(&mut s, &mut buf, &mut closed);
        if buf.len() > before {
            last_data = Instant::now();
        }
        let answered = parse_responses(&buf).0.iter().any(|r| r.status >= 200);
        let quiet = if answered && !patient { 300 } else { 1500 };
        if last_data.elapsed() >= Duration::from_millis(quiet) {
            break;
        }
    }
    out.closed_by_peer = closed;
    let (responses, rest) = parse_responses(&buf);
    out.responses = responses;
    out.unparsed = rest;
    out
}

/// Reads what is available (until a 100 ms read timeout); sets `closed` on EOF or error.
fn drain(s: &mut TcpStream, buf: &mut Vec<u8>, closed: &mut bool) {
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => {
                *closed = true;
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
            Err(_) => {
                *closed = true;
                return;
            }
        }
    }
}

/// Parses consecutive HTTP/1.x responses; returns them and the number of unparsed bytes.
fn parse_responses(mut buf: &[u8]) -> (Vec<Resp>, usize) {
    let mut out = vec![];
    loop {
        let Some(end) = find(buf, b"\r\n\r\n") else {
            return (out, buf.len());
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = match status_line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        {
            Some(s) => s,
            None => return (out, buf.len()),
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut rest = &buf[end + 4..];
        let mut resp = Resp {
            status,
            headers,
            body: vec![],
        };
        let no_body = (100..200).contains(&status) || status == 204 || status == 304;
        if no_body {
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            loop {
                let Some(line_end) = find(rest, b"\r\n") else {
                    out.push(resp);
                    return (out, rest.len());
                };
                let size_text = String::from_utf8_lossy(&rest[..line_end]);
                let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
                let Ok(size) = usize::from_str_radix(&size_text, 16) else {
                    out.push(resp);
                    return (out, rest.len());
                };
                rest = &rest[line_end + 2..];
                if size == 0 {
                    let trailer_end = find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
                    rest = &rest[trailer_end..];
                    break;
                }
                let take = size.min(rest.len());
                resp.body.extend_from_slice(&rest[..take]);
                rest = &rest[(take + 2).min(rest.len())..];
            }
        } else if let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let take = len.min(rest.len());
            resp.body.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        } else {
            resp.body.extend_from_slice(rest);
            rest = &[];
        }
        out.push(resp);
        buf = rest;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A TCP listener counting every connection made to it (what `evil.example` resolves to).
struct Canary {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Canary {
    fn start() -> Canary {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (connections.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut b = [0u8; 4096];
                            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Canary {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header_values<'a>(echo: &'a Value, name: &str) -> Vec<&'a str> {
    echo["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn hostile_corpus_is_rejected_and_the_proxy_keeps_serving() {
    let tc = fake();
    let canary = Canary::start();
    let evil_443 = format!("evil.example:443:127.0.0.1:{}", canary.port);
    let evil_80 = format!("evil.example:80:127.0.0.1:{}", canary.port);
    let mut proxy = proxy_for(&tc, &["--connect-to", &evil_443, "--connect-to", &evil_80]);
    let addr = proxy.addr();

    // Baseline: a normal request is signed and verified.
    let ok = send(addr, "GET", b"/queue/v1/baseline", &[], b"");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_auth_ok(&ok.echo());

    let cases = corpus(tc.port());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
    }
    println!("hostile corpus: {} requests", cases.len());

    let mut failures: Vec<String> = vec![];
    let mut outcomes: BTreeMap<&str, (Class, Outcome)> = BTreeMap::new();
    for c in &cases {
        let outcome = run(addr, &c.steps, c.class == Class::Smuggle);
        if !proxy.is_running() {
            panic!(
                "proxy died on case {}\n--- stderr ---\n{}",
                c.name,
                proxy.stderr_text()
            );
        }
        for r in &outcome.responses {
            let from_upstream = r.header("x-taskcluster-endpoint").is_some();
            let ok_status = (100..200).contains(&r.status) || r.status >= 400;
            match c.class {
                Class::Reject | Class::NoSuccess if !ok_status => failures.push(format!(
                    "{}: status {} (from upstream: {from_upstream}) for a request to refuse",
                    c.name, r.status
                )),
                Class::Lenient if (200..300).contains(&r.status) => {
                    let verified = serde_json::from_slice::<Value>(&r.body)
                        .map(|v| v["auth"]["ok"] == Value::Bool(true))
                        .unwrap_or(false);
                    if !from_upstream || !verified {
                        failures.push(format!(
                            "{}: 2xx that is not a verified upstream echo: {:?}",
                            c.name,
                            String::from_utf8_lossy(&r.body)
                        ));
                    }
                }
                _ => {}
            }
        }
        if c.class == Class::Smuggle {
            let finals = outcome.responses.iter().filter(|r| r.status >= 200).count();
            if finals > 1 || (finals == 1 && !outcome.closed_by_peer) {
                failures.push(format!(
                    "{}: {finals} response(s) and the connection {} after conflicting framing",
                    c.name,
                    if outcome.closed_by_peer {
                        "closed"
                    } else {
                        "left open"
                    }
                ));
            }
        }
        outcomes.insert(c.name, (c.class, outcome));
    }

    // Let the fake finish logging requests whose bodies were cut off.
    thread::sleep(Duration::from_millis(500));
    let seen = tc.requests();
    let mut reached: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for echo in &seen {
        let target = echo["target"].as_str().unwrap_or("").to_string();
        let tags = header_values(echo, "x-case");
        if target == "/api/queue/v1/baseline" {
            continue;
        }
        if std::env::var_os("HOSTILE_VERBOSE").is_some() {
            println!(
                "upstream saw {tags:?}: {} {target:?} headers={}",
                echo["method"], echo["headers"]
            );
        }
        if tags.is_empty() {
            failures.push(format!("untagged request reached the upstream: {target:?}"));
        }
        for t in &tags {
            if t.ends_with("-smuggled") {
                failures.push(format!(
                    "smuggled request reached the upstream: {t} {target:?}"
                ));
            }
            reached
                .entry(t.to_string())
                .or_default()
                .push(format!("{} {}", echo["status"], echo["auth"]["ok"]));
        }
        if target.contains("SMUGGLED") {
            failures.push(format!("smuggled target reached the upstream: {target:?}"));
        }
        let lengths = header_values(echo, "content-length");
        let chunked = !header_values(echo, "transfer-encoding").is_empty();
        if lengths.len() > 1 || (chunked && !lengths.is_empty()) {
            failures.push(format!(
                "conflicting framing reached the upstream for {tags:?}: \
                 content-length {lengths:?}, chunked {chunked}"
            ));
        }
        for (name, values) in echo["headers"].as_object().into_iter().flatten() {
            let injected = name.contains("injected")
                || values.as_array().into_iter().flatten().any(|v| {
                    v.as_str()
                        .is_some_and(|v| v.to_ascii_lowercase().contains("x-injected-path"))
                });
            if injected {
                failures.push(format!(
                    "injected header reached the upstream: {name}: {values} (target {target:?})"
                ));
            }
        }
    }
    for (name, (class, _)) in &outcomes {
        if *class == Class::Reject && reached.contains_key(*name) {
            failures.push(format!(
                "{name}: must not be forwarded, but reached the upstream ({:?})",
                reached[*name]
            ));
        }
    }
    if canary.connections() > 0 {
        failures.push(format!(
            "{} connection(s) reached evil.example",
            canary.connections()
        ));
    }

    // Report every case.
    for (name, (class, o)) in &outcomes {
        let statuses: Vec<u16> = o.responses.iter().map(|r| r.status).collect();
        println!(
            "{name:36} {class:9?} statuses={statuses:?} closed={} unparsed={} \
             write_error={} upstream={:?}",
            o.closed_by_peer,
            o.unparsed,
            o.write_error.is_some(),
            reached.get(*name)
        );
    }

    // The proxy is alive and still signs correctly.
    assert!(proxy.is_running(), "proxy died:\n{}", proxy.stderr_text());
    for _ in 0..3 {
        let ok = send(
            addr,
            "POST",
            b"/queue/v1/after-corpus?x=1",
            &[],
            b"{\"a\":1}",
        );
        assert_eq!(ok.status, 200, "{}", ok.text());
        let echo = ok.echo();
        assert_auth_ok(&echo);
        assert_eq!(echo["target"], "/api/queue/v1/after-corpus?x=1");
        assert_eq!(echo["body_len"], 7);
    }

    // The canary really would have noticed: a legitimate hostname-form request reaches it.
    let before = canary.connections();
    let _ = support::client::try_send(addr, "GET", b"/evil.example/x", &[], b"");
    assert!(
        support::wait_until(Duration::from_secs(5), || canary.connections() > before),
        "hostname-form control request never reached the canary: the corpus check is vacuous"
    );

    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Connections that must not be kept alive are closed right after the response: HTTP/1.0
/// without `Connection: keep-alive`, `Connection: close`, and (RFC 9112 §6.1) a request that
/// carried both `Content-Length` and `Transfer-Encoding`. A client reading an HTTP/1.0
/// response until EOF would otherwise hang for the keep-alive timeout.
#[test]
fn connections_that_must_close_are_closed_after_the_response() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    for (name, request) in [
        ("http/1.0", tag(&line("GET /queue/v1/x HTTP/1.0"), "http10")),
        (
            "connection: close",
            tag(&headers("Connection: close\r\n"), "close"),
        ),
        (
            "content-length and transfer-encoding",
            tag(
                &post(
                    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n",
                ),
                "cl-te",
            ),
        ),
    ] {
        let mut s = TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&request).unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let closed = match s.read_to_end(&mut buf) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        };
        let (responses, _) = parse_responses(&buf);
        assert_eq!(
            responses.iter().map(|r| r.status).collect::<Vec<_>>(),
            vec![200],
            "{name}: {}",
            String::from_utf8_lossy(&buf)
        );
        assert!(
            closed && start.elapsed() < Duration::from_secs(4),
            "{name}: connection kept open after the response"
        );
    }
}
