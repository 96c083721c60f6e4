//! The HTTP endpoint of `--metrics-addr`.
//!
//! [`serve`] binds a `std::net::TcpListener` and answers on a background thread:
//! `GET /metrics` (or `HEAD`) with `Content-Type: text/plain; version=0.0.4`, 404 for other
//! paths, 405 for other methods, 400 for a malformed request. Every response closes the
//! connection. Each connection gets its own short-lived thread (at most
//! [`MAX_CONNECTIONS`] at once; more are closed unanswered) with read and write timeouts,
//! and the whole request head must arrive within [`REQUEST_DEADLINE`]: a stuck client
//! cannot block other scrapes, nor hold a thread for long. The endpoint has no
//! authentication: bind it to a loopback address.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::render;

/// Connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a client has to send its request head (and for each read or write).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// The running endpoint. [`MetricsServer::stop`] (or drop) closes the listener and joins
/// its thread; connections in flight finish on their own within their timeouts.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

/// Binds `addr` and serves [`render`] at `/metrics` on a background thread. Fails only if
/// the bind fails (address in use, not local, ...).
pub fn serve(addr: SocketAddr) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let listener_fd = listener.as_raw_fd();
    let flag = stopping.clone();
    let thread = std::thread::Builder::new()
        .name("cachefs-metrics".into())
        .spawn(move || accept_loop(listener, &flag))?;
    Ok(MetricsServer {
        addr,
        stopping,
        listener_fd,
        thread: Some(thread),
    })
}

impl MetricsServer {
    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and joins the accept thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocked accept(): on Linux, shutting a listening socket down makes
        // accept fail with EINVAL. The fd is still open: the thread owns the listener
        // until it returns, and we join it below. Should that not work, connect to it.
        // SAFETY: a valid socket fd (see above).
        if unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) } != 0 {
            let _ = TcpStream::connect_timeout(&connectable(self.addr), REQUEST_DEADLINE);
        }
        if thread.join().is_err() {
            log::error!("the metrics server thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `addr` with an unspecified IP (0.0.0.0, ::) replaced by loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn accept_loop(listener: TcpListener, stopping: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("metrics server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::debug!("metrics server: too many connections; closing one unanswered");
            continue;
        }
        let done = active.clone();
        let spawned = std::thread::Builder::new()
            .name("cachefs-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = handle(stream) {
                    log::debug!("metrics server: {e}");
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("metrics server: cannot start a connection thread: {e}");
        }
    }
}

/// Serves one request on `stream` and closes it.
fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_DEADLINE))?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let head = read_head(&mut stream)?;
    let (status, content_type, body, head_only) = respond(&head, render);
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        msg.push_str("Allow: GET, HEAD\r\n");
    }
    msg.push_str("\r\n");
    let mut bytes = msg.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&bytes)?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads up to the end of the request head (`\r\n\r\n`), within [`REQUEST_DEADLINE`] and
/// [`MAX_REQUEST`] bytes. A head cut short by EOF is returned as is (and judged by
/// [`respond`]).
fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client too slow to send its request",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The response to a request head: (status line, content type, body, HEAD request).
/// `body` renders the metrics, only when they are asked for.
fn respond(
    head: &[u8],
    body: impl FnOnce() -> String,
) -> (&'static str, &'static str, String, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", TEXT, "bad request\n".into(), false);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return ("400 Bad Request", TEXT, "bad request\n".into(), false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (
            "405 Method Not Allowed",
            TEXT,
            "only GET and HEAD\n".into(),
            false,
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if path != "/metrics" {
        return (
            "404 Not Found",
            TEXT,
            "not found; the metrics are at /metrics\n".into(),
            head_only,
        );
    }
    (
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        body(),
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::check_format;

    #[test]
    fn requests_get_the_right_responses() {
        let body = || "m 1\n".to_string();
        let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", body);
        assert_eq!(
            r,
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                "m 1\n".to_string(),
                false
            )
        );
        let r = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", body);
        assert_eq!(r.0, "200 OK");
        let r = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", body);
        assert_eq!((r.0, r.3), ("200 OK", true));
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", body).0, "404 Not Found");
        assert_eq!(
            respond(b"GET /metricsx HTTP/1.1\r\n\r\n", body).0,
            "404 Not Found"
        );
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", body).0,
            "405 Method Not Allowed"
        );
        for bad in [
            &b""[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"\xff\xfe",
        ] {
            assert_eq!(respond(bad, body).0, "400 Bad Request", "{bad:?}");
        }
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn server_serves_and_stops() {
        let server = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(head.contains("\r\nConnection: close"));
        check_format(body);
        let r = get(addr, "GET /nope HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        let r = get(addr, "DELETE /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405") && r.contains("\r\nAllow: GET, HEAD\r\n"));
        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );

        // A second bind of the same port fails (the caller reports it).
        assert!(serve(addr).is_err());

        let t = Instant::now();
        server.stop();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            t.elapsed()
        );
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening after stop"
        );
    }

    #[test]
    fn stuck_client_does_not_block_others() {
        let server = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        // Connected, sends half a request, then nothing.
        let mut stuck = TcpStream::connect(addr).unwrap();
        stuck.write_all(b"GET /metr").unwrap();
        let idle = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"));
        assert!(t.elapsed() < REQUEST_DEADLINE, "waited {:?}", t.elapsed());
        // The stuck one is cut off after the deadline.
        stuck.set_read_timeout(Some(REQUEST_DEADLINE * 3)).unwrap();
        let mut buf = Vec::new();
        let _ = stuck.read_to_end(&mut buf);
        assert!(t.elapsed() < REQUEST_DEADLINE * 3);
        drop(idle);
        // Stopping does not wait for connections.
        server.stop();
    }

    #[test]
    fn unspecified_addresses_are_connectable() {
        let a: SocketAddr = "0.0.0.0:9".parse().unwrap();
        assert_eq!(connectable(a), "127.0.0.1:9".parse().unwrap());
        let a: SocketAddr = "[::]:9".parse().unwrap();
        assert_eq!(connectable(a), "[::1]:9".parse().unwrap());
        let a: SocketAddr = "10.1.2.3:9".parse().unwrap();
        assert_eq!(connectable(a), a);
    }
}
