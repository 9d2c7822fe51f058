//! Large bodies stream through the proxy without being buffered: 1 GiB each way with
//! Content-Length, a chunked variant, and a bound on the proxy's peak RSS.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::client;
use support::{fake, proxy_for, ProxyProcess};

const GIB: u64 = 1024 * 1024 * 1024;
const MAX_PEAK_RSS_KIB: u64 = 64 * 1024;

fn report_rss(proxy: &ProxyProcess, what: &str) {
    let peak = proxy.peak_rss_kib();
    println!(
        "{what}: proxy peak RSS {peak} KiB ({:.1} MiB), current {} KiB",
        peak as f64 / 1024.0,
        proxy.rss_kib()
    );
    eprintln!("{what}: proxy peak RSS {peak} KiB");
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "{what}: proxy peak RSS {peak} KiB exceeds {MAX_PEAK_RSS_KIB} KiB"
    );
}

#[test]
fn download_1gib_with_content_length() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let start = Instant::now();
    let d = client::download(proxy.addr(), &format!("/queue/v1/__download/{GIB}"), &[]);
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "1 GiB download in {secs:.1} s ({:.0} MiB/s)",
        d.len as f64 / 1048576.0 / secs
    );
    assert_eq!(d.status, 200);
    assert_eq!(d.error, None);
    assert_eq!(d.len, GIB);
    assert!(d.pattern_ok, "corrupted at byte {:?}", d.first_mismatch);
    assert_eq!(d.header("content-length"), Some(GIB.to_string().as_str()));
    report_rss(&proxy, "1 GiB download");
}

#[test]
fn upload_1gib_with_content_length() {
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let start = Instant::now();
    let r = client::upload(proxy.addr(), "PUT", "/queue/v1/upload", &[], GIB, false)
        .expect("upload response");
    let secs = start.elapsed().as_secs_f64();
    eprintln!("1 GiB upload in {secs:.1} s ({:.0} MiB/s)", 1024.0 / secs);
    let e = support::ok_echo(&r);
    assert_eq!(e["body_len"], json!(GIB));
    assert_eq!(e["body_pattern"], json!(true));
    assert_eq!(e["body_error"], json!(null));
    assert_eq!(e["headers"]["content-length"], json!([GIB.to_string()]));
    report_rss(&proxy, "1 GiB upload");
}

#[test]
fn chunked_download_and_upload() {
    const N: u64 = 96 * 1024 * 1024 + 12345;
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let d = client::download(
        proxy.addr(),
        &format!("/queue/v1/__download/{N}?chunked=1"),
        &[],
    );
    assert_eq!(d.status, 200);
    assert_eq!(d.error, None);
    assert_eq!(d.len, N);
    assert!(d.pattern_ok, "corrupted at byte {:?}", d.first_mismatch);

    let r = client::upload(proxy.addr(), "POST", "/queue/v1/upload", &[], N, true)
        .expect("upload response");
    let e = support::ok_echo(&r);
    assert_eq!(e["body_len"], json!(N));
    assert_eq!(e["body_pattern"], json!(true));
    report_rss(&proxy, "chunked 96 MiB download + upload");
}

#[test]
fn upload_with_expect_100_continue() {
    // curl sends `Expect: 100-continue` for large uploads and waits (1 s) for the interim
    // response before sending the body; either way the upload must arrive intact.
    const N: u64 = 8 * 1024 * 1024;
    let tc = fake();
    let proxy = proxy_for(&tc, &[]);
    let mut conn =
        client::Conn::connect_with_timeout(proxy.addr(), Duration::from_secs(3)).expect("connect");
    conn.write_head(
        "PUT",
        b"/queue/v1/expect",
        &[("Expect", "100-continue"), ("Connection", "close")],
        client::Framing::Length(N),
    )
    .unwrap();
    let interim = conn.read_one_head();
    let got_100 = matches!(interim, Ok((100, _, _)));
    eprintln!("interim response: {interim:?}");
    if let Ok((status, _, _)) = &interim {
        assert_eq!(
            *status, 100,
            "no final response may come before the body is sent"
        );
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    while pos < N {
        let n = (N - pos).min(buf.len() as u64) as usize;
        support::pattern::fill(&mut buf[..n], pos);
        conn.write_raw(&buf[..n]).unwrap();
        pos += n as u64;
    }
    conn.flush().unwrap();
    let r = conn.read_response("PUT").expect("final response");
    let e = support::ok_echo(&r);
    assert_eq!(e["body_len"], json!(N));
    assert_eq!(e["body_pattern"], json!(true));
    eprintln!("proxy sent 100 Continue: {got_100}");
}
