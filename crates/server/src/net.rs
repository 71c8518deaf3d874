//! The listener: accepting TCP connections within bounds and serving HTTP/1.1 (and the
//! WebSocket upgrade) on each.
//!
//! Why not `axum::serve`: it has no header-read timeout, no bound on connections and sleeps
//! silently when `accept` fails. Measured before this module: 21,000 silent connections from
//! one host filled the 20,000-descriptor limit within 10 s, and `/healthz` and new WebSocket
//! connects timed out for as long as they were held. Here:
//!
//! - every connection counts against a total (below the process's descriptor limit, read at
//!   start) and against its client address (an IPv4 address, or an IPv6 /64: one host owns a
//!   whole /64); a connection over either bound gets a short `503` and is closed at once;
//! - a client has `header_timeout_secs` to send each request's headers, from the moment the
//!   connection is accepted and again between keep-alive requests: silent and dripping
//!   connections are shed (the WebSocket handshake and idle timeouts take over after an
//!   upgrade);
//! - when `accept` fails for lack of descriptors (EMFILE/ENFILE) the loop backs off (5 ms
//!   doubling to 1 s), logs once per episode and counts it, and keeps serving the connections
//!   it has;
//! - a connection can be reset (`SO_LINGER` 0) instead of closed: a slow consumer whose
//!   buffers are full would otherwise keep its kernel buffers and half-sent frames for minutes
//!   ([`ConnControl`]).
//!
//! Behind a proxy every connection comes from the proxy. For the per-address rate limits the
//! HTTP handlers see [`ClientAddr`]: the peer, or, when the peer is one of
//! `connections.trusted_proxies`, the client it names in `X-Forwarded-For` ([`TrustedProxies`]).
//! The connection bounds above stay on the peer: the proxy limits connections per client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::ConnectionLimits;

/// Largest request head (and read buffer) per connection: 16 KiB of headers is plenty for
/// this API, and a dripping client cannot make a connection hold more.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The process's open-file limit, from `/proc/self/limits` (Linux); `None` elsewhere.
pub fn descriptor_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files            20000                20000                files"
    let soft = line.split_whitespace().nth(3)?;
    soft.parse().ok()
}

/// The total connection bound: the descriptor limit minus a reserve of a tenth (at least 64)
/// for the database, media files, the listener and the logs; or the configured one, which is
/// honoured even above that (with a warning: accepting may then fail for lack of descriptors,
/// which the accept loop survives).
pub fn total_bound(configured: usize, descriptors: Option<u64>) -> usize {
    let Some(limit) = descriptors else {
        return if configured == 0 { 10_000 } else { configured };
    };
    let reserve = (limit / 10).max(64);
    let room = limit.saturating_sub(reserve).max(1) as usize;
    match configured {
        0 => room,
        n => {
            if n > room {
                tracing::warn!(
                    configured = n,
                    descriptors = limit,
                    advised = room,
                    "connections.max_total leaves no reserve below the descriptor limit"
                );
            }
            n
        }
    }
}

/// The key a client address is counted under: IPv4 addresses (also IPv4-mapped IPv6) as they
/// are, IPv6 by /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerAddress,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerAddress => "per_address",
        }
    }
}

/// Counts open connections, in all and per address key.
pub struct ConnLimiter {
    max_total: usize,
    max_per_address: usize,
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_address,
            inner: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a connection from `ip`, or says why there is none.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let key = address_key(ip);
        let mut c = self.inner.lock().map_err(|_| Refusal::Total)?;
        if c.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = c.per_address.entry(key).or_default();
        if self.max_per_address > 0 && *n >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        c.total += 1;
        metrics::gauge!("tern_tcp_connections").set(c.total as f64);
        Ok(ConnPermit {
            limiter: self.clone(),
            key,
        })
    }

    /// Open connections in all.
    pub fn open(&self) -> usize {
        self.inner.lock().map(|c| c.total).unwrap_or(0)
    }

    /// Open connections counted under `ip`'s key.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.inner
            .lock()
            .map(|c| c.per_address.get(&address_key(ip)).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// A connection's place; given back when the socket is dropped.
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let Ok(mut c) = self.limiter.inner.lock() else {
            return;
        };
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.key);
            }
        }
        metrics::gauge!("tern_tcp_connections").set(c.total as f64);
    }
}

/// Lets the code serving a connection ask for it to be reset rather than closed when the
/// socket is dropped (handed to handlers as a request extension).
#[derive(Clone, Default)]
pub struct ConnControl(Arc<AtomicBool>);

impl ConnControl {
    /// When the socket is dropped, send RST and discard what is still buffered.
    pub fn reset_on_close(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A TCP stream that holds its connection's place and can be reset on drop.
struct ConnIo {
    tcp: TcpStream,
    control: ConnControl,
    _permit: ConnPermit,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.control.0.load(Ordering::Relaxed) {
            // Linger 0: close() sends RST and frees the buffers at once; it does not block.
            let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Logs an event at most once per interval (refusals come in floods).
struct Throttled {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new(every: Duration) -> Self {
        Throttled {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, `n` events were suppressed since the last line.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (process limit) and ENFILE (system limit); ENOBUFS/ENOMEM are the same story.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// The address a request comes from, as the rate limits see it: the TCP peer, or the client a
/// trusted proxy forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The proxies whose `X-Forwarded-For` is believed (`connections.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

/// The most `X-Forwarded-For` entries looked at, right to left.
const MAX_FORWARDED_HOPS: usize = 16;

impl TrustedProxies {
    /// Addresses (`10.0.0.7`, `::1`) or networks (`10.0.0.0/8`).
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        list.iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{s:?} is neither an IP address nor a network"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer`. From a trusted proxy: the rightmost
    /// `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its left were
    /// written by the client and prove nothing); the nearest trusted hop when an entry does
    /// not parse; the peer when there is no header.
    pub fn client(&self, peer: IpAddr, headers: &hyper::HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops = Vec::new();
        for value in headers.get_all("x-forwarded-for").iter() {
            // Bytes, not text: a stray byte a client wrote must not hide what the proxy added.
            hops.extend(value.as_bytes().split(|&b| b == b','));
        }
        let mut client = peer;
        for hop in hops.iter().rev().take(MAX_FORWARDED_HOPS) {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip.to_canonical();
                    if !self.trusts(client) {
                        return client;
                    }
                }
                None => return client,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `192.0.2.1`, `2001:db8::1`, and the same with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), which some proxies add.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The answer to a refused connection, written without waiting (a full socket gets nothing).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: 99\r\n\r\n{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections; retry later\",\"retry_after_secs\":5}}";

/// Accepts connections until `shutdown`, serving `app` on each; returns once every HTTP
/// connection has finished (upgraded WebSockets are tracked by their own tasks) or 10 s
/// after `shutdown`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: &ConnectionLimits,
    limiter: Arc<ConnLimiter>,
    shutdown: CancellationToken,
) {
    let header_timeout = Duration::from_secs(limits.header_timeout_secs);
    let proxies = Arc::new(
        TrustedProxies::parse(&limits.trusted_proxies).unwrap_or_else(|e| {
            // `Config::validate` refuses this before the listener starts.
            tracing::error!(error = %e, "connections.trusted_proxies ignored");
            TrustedProxies::default()
        }),
    );
    let tasks = TaskTracker::new();
    let mut refused_log = Throttled::new(Duration::from_secs(10));
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) if out_of_descriptors(&e) => {
                metrics::counter!("tern_accept_errors_total", "reason" => "descriptors")
                    .increment(1);
                if backoff.is_zero() {
                    tracing::error!(error = %e, open = limiter.open(), "cannot accept: out of file descriptors; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
            Err(e) => {
                // The peer went away between SYN and accept, and the like.
                metrics::counter!("tern_accept_errors_total", "reason" => "other").increment(1);
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                metrics::counter!("tern_connections_refused_total", "reason" => why.as_str())
                    .increment(1);
                if let Some(suppressed) = refused_log.tick() {
                    tracing::warn!(
                        peer = %peer.ip(),
                        reason = why.as_str(),
                        open = limiter.open(),
                        suppressed,
                        "connection refused: too many connections"
                    );
                }
                let _ = tcp.try_write(REFUSED);
                continue;
            }
        };
        // Small frames must leave at once: with Nagle's algorithm the second of two small
        // writes waits for the peer's delayed ACK (40 ms here): measured ~42 ms from Welcome
        // to Synced.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let control = ConnControl::default();
        let io = TokioIo::new(ConnIo {
            tcp,
            control: control.clone(),
            _permit: permit,
        });
        let app = app.clone();
        let proxies = proxies.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let client = proxies.client(peer.ip(), req.headers());
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(ClientAddr(client));
            req.extensions_mut().insert(control.clone());
            let mut app = app.clone();
            async move {
                let resp: Result<_, Infallible> = app.call(req.map(Body::new)).await;
                resp
            }
        });
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish within 10 s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn the_client_behind_a_trusted_proxy() {
        let proxies =
            TrustedProxies::parse(&["127.0.0.1".into(), "10.0.0.0/8".into()]).expect("parses");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let proxy = ip("127.0.0.1");
        // No header, or a peer that is not trusted: the peer.
        assert_eq!(proxies.client(proxy, &forwarded(&[])), proxy);
        let stranger = ip("198.51.100.9");
        assert_eq!(
            proxies.client(stranger, &forwarded(&["203.0.113.5"])),
            stranger,
            "a header from an untrusted peer is ignored"
        );
        // The rightmost entry that is not a trusted proxy; what the client wrote to its left
        // proves nothing.
        assert_eq!(
            proxies.client(proxy, &forwarded(&["1.1.1.1, 203.0.113.5"])),
            ip("203.0.113.5")
        );
        assert_eq!(
            proxies.client(proxy, &forwarded(&["1.1.1.1", "203.0.113.5, 10.1.2.3"])),
            ip("203.0.113.5"),
            "through two proxies, over two headers"
        );
        assert_eq!(
            proxies.client(proxy, &forwarded(&["junk, 10.1.2.3"])),
            ip("10.1.2.3"),
            "an entry that does not parse: the nearest trusted hop"
        );
        assert_eq!(
            proxies.client(ip("::ffff:127.0.0.1"), &forwarded(&["2001:db8::1"])),
            ip("2001:db8::1"),
            "an IPv4-mapped peer is its IPv4 address"
        );
        assert_eq!(
            proxies.client(proxy, &forwarded(&["192.0.2.7:4711"])),
            ip("192.0.2.7"),
            "with a port"
        );
        assert_eq!(
            proxies.client(proxy, &forwarded(&["[2001:db8::2]:4711"])),
            ip("2001:db8::2")
        );
        let mut raw = hyper::HeaderMap::new();
        raw.append(
            "x-forwarded-for",
            hyper::header::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").expect("header"),
        );
        assert_eq!(
            proxies.client(proxy, &raw),
            ip("203.0.113.9"),
            "bytes a client wrote do not hide the proxy's entry"
        );
        let none = TrustedProxies::default();
        assert_eq!(none.client(proxy, &forwarded(&["203.0.113.5"])), proxy);
    }

    #[test]
    fn addresses_are_counted_per_host() {
        let v4: IpAddr = "203.0.113.7".parse().expect("ip");
        assert_eq!(address_key(v4), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b), "one /64");
        assert_ne!(address_key(a), address_key(other));
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().expect("ip");
        assert_eq!(address_key(mapped), v4);
    }

    #[test]
    fn limiter_counts_and_gives_back() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p1 = l.try_acquire(a).expect("1");
        let p2 = l.try_acquire(a).expect("2");
        assert_eq!(l.try_acquire(a).err(), Some(Refusal::PerAddress));
        let p3 = l.try_acquire(b).expect("3");
        assert_eq!(l.try_acquire(b).err(), Some(Refusal::Total));
        drop(p1);
        assert_eq!(l.open(), 2);
        assert_eq!((l.open_from(a), l.open_from(b)), (1, 1));
        let _p4 = l.try_acquire(a).expect("a place came back");
        drop((p2, p3));
        assert_eq!(l.open(), 1);
        let unlimited = ConnLimiter::new(10, 0);
        let held: Vec<_> = (0..10)
            .map(|_| unlimited.try_acquire(a).expect("no per-address bound"))
            .collect();
        assert_eq!(held.len(), 10);
    }

    #[test]
    fn total_bound_keeps_a_reserve() {
        assert_eq!(total_bound(0, Some(20_000)), 18_000);
        assert_eq!(total_bound(0, Some(256)), 192);
        assert_eq!(total_bound(5_000, Some(20_000)), 5_000);
        assert_eq!(
            total_bound(50_000, Some(20_000)),
            50_000,
            "the operator's choice"
        );
        assert_eq!(total_bound(0, None), 10_000);
    }

    #[test]
    fn the_refusal_is_valid_http() {
        let text = std::str::from_utf8(REFUSED).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse().ok())
            .expect("length");
        assert_eq!(body.len(), len);
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "unavailable");
    }

    #[test]
    fn reads_the_descriptor_limit() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(descriptor_limit().is_some_and(|n| n > 0));
        }
    }
}
