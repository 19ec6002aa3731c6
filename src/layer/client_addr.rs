//! The client's address: the connection's peer, or, only when that peer is a trusted proxy, the
//! address the proxies reported in the one header they write (`X-Forwarded-For` by default, or
//! `Forwarded`).
//!
//! The failed-authentication limiter, application services' IP allow-lists and logs all need it.
//! A header is believed only from a configured proxy, and only as far as the chain of proxies is
//! trusted: the client is the rightmost hop that is not a trusted proxy. A client can write
//! anything into the header it sends, but every trusted proxy appends the address it saw, so the
//! hops right of the first untrusted one are the proxies' own words.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::header::{HeaderName, FORWARDED};
use http::request::Parts;
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The address of the client that made a request, as the layer determined it; the layer puts it
/// in the request's extensions for handlers and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// The connection's peer address, for servers that do not use axum's `ConnectInfo`: insert it
/// into each request's extensions (`request.extensions_mut().insert(PeerAddr(remote))`). The
/// layer also reads a `std::net::SocketAddr` extension, and whatever
/// [`crate::MatrixAuthLayer::peer_addr`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// A set of networks (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a network of one), as
/// trusted proxies and application services' allow-lists are written.
///
/// ```
/// use tower_matrix_auth::layer::IpRanges;
/// let ranges: IpRanges = "10.0.0.0/8, 127.0.0.1".parse().unwrap();
/// assert!(ranges.contains("10.1.2.3".parse().unwrap()));
/// assert!(!ranges.contains("192.0.2.1".parse().unwrap()));
/// assert!("10.0.0.0/33".parse::<IpRanges>().is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IpRanges {
    networks: Arc<[IpNet]>,
}

/// The proxies whose forwarding header is believed (`"10.0.0.0/8, ::1".parse()`, or
/// [`TrustedProxies::new`] from [`IpRanges`]), and which header that is.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: IpRanges,
    header: ForwardedHeader,
}

/// The header the trusted proxies write the client's address into. Only that one is read, never
/// the other: a proxy appends to the header it manages and passes the other on as the client
/// wrote it (nginx's `$proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`, Traefik and
/// most load balancers write `X-Forwarded-For` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`. The default.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

/// A list of networks that does not parse: the offending entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIpRanges(String);

impl fmt::Display for InvalidIpRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a network (`10.0.0.0/8`) or an address",
            self.0
        )
    }
}

impl std::error::Error for InvalidIpRanges {}

impl FromStr for IpRanges {
    type Err = InvalidIpRanges;

    /// A comma-separated list of networks or addresses; empty entries are ignored.
    fn from_str(list: &str) -> Result<Self, InvalidIpRanges> {
        let networks = list
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| canonical_net(net.trunc()))
                    .map_err(|_| InvalidIpRanges(entry.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            networks: networks.into(),
        })
    }
}

impl IpRanges {
    /// Whether `addr` is in one of the networks. An IPv4-mapped IPv6 address (a dual-stack
    /// socket's view of an IPv4 peer) is judged as the IPv4 address it is.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.networks.iter().any(|net| net.contains(&addr))
    }

    /// Whether there is no network at all.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

impl FromStr for TrustedProxies {
    type Err = InvalidIpRanges;

    /// A comma-separated list of networks or addresses, as [`IpRanges`].
    fn from_str(list: &str) -> Result<Self, InvalidIpRanges> {
        list.parse().map(Self::new)
    }
}

impl TrustedProxies {
    /// These proxies, writing `X-Forwarded-For`.
    pub fn new(ranges: IpRanges) -> Self {
        Self {
            ranges,
            header: ForwardedHeader::XForwardedFor,
        }
    }

    /// The header these proxies write (default `X-Forwarded-For`); the other is ignored.
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// No trusted proxy: the peer address is the client's, headers are never read.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether `addr` belongs to a trusted proxy.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.ranges.contains(addr)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The client behind `peer`: `peer` itself unless it is a trusted proxy; then the rightmost
    /// hop of the configured header that is not a trusted proxy (every trusted proxy appends the
    /// address it saw, so the hops right of the first untrusted one are the proxies' own words).
    /// When every hop is trusted, the leftmost is the client; with no header at all, the peer.
    ///
    /// `None` when the walk meets a hop it cannot read (not an address, not UTF-8, `unknown`,
    /// an obfuscated name) before an untrusted one: who is behind it is unknown, and it is never
    /// taken to be the proxy itself (an allow-list must not pass such a request).
    pub fn client(&self, peer: IpAddr, parts: &Parts) -> Option<IpAddr> {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return Some(peer);
        }
        let name = match self.header {
            ForwardedHeader::XForwardedFor => &X_FORWARDED_FOR,
            ForwardedHeader::Forwarded => &FORWARDED,
        };
        let mut client = peer;
        // Lines from the last, hops within a line from the right, without allocating.
        for line in parts.headers.get_all(name).iter().rev() {
            for hop in line.as_bytes().rsplit(|&b| b == b',') {
                let hop = match self.header {
                    ForwardedHeader::XForwardedFor => parse_hop(hop),
                    ForwardedHeader::Forwarded => forwarded_for(hop),
                };
                client = hop?;
                if !self.contains(client) {
                    return Some(client);
                }
            }
        }
        Some(client)
    }
}

/// The `for=` of one `Forwarded` element (RFC 7239), if it names an address.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    element.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let at = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = (&pair[..at], &pair[at + 1..]);
        if !key.trim_ascii().eq_ignore_ascii_case(b"for") {
            return None;
        }
        let value = value.trim_ascii();
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        // A `for=` that is no address ends the walk as an unreadable hop does.
        Some(parse_hop(value))
    })?
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`; surrounding spaces ignored.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop.trim_ascii()).ok()?;
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(canonical(addr));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

/// A network of IPv4-mapped IPv6 addresses (`::ffff:10.0.0.0/104`) as the IPv4 network it
/// stands for, since addresses are compared in their IPv4 form.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(IpNet::V6(v6), IpNet::V4)
            }
            None => IpNet::V6(v6),
        },
        net => net,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Debug for IpRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.networks.iter()).finish()
    }
}

impl fmt::Debug for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustedProxies").field(&self.ranges).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &[u8])]) -> Parts {
        let mut request = http::Request::get("/x");
        for (name, value) in headers {
            request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        request.body(()).unwrap().into_parts().0
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let spoofed = parts(&[
            ("x-forwarded-for", b"203.0.113.9"),
            ("forwarded", b"for=203.0.113.9"),
        ]);
        assert_eq!(
            proxies.client(ip("198.51.100.7"), &spoofed),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            TrustedProxies::none().client(ip("10.0.0.1"), &spoofed),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_of_x_forwarded_for() {
        let proxies: TrustedProxies = "10.0.0.0/8, 192.168.0.1".parse().unwrap();
        let peer = ip("10.0.0.2");
        let client = |value: &[u8]| proxies.client(peer, &parts(&[("x-forwarded-for", value)]));
        assert_eq!(client(b"198.51.100.7"), Some(ip("198.51.100.7")));
        // The client wrote the leftmost entries; the proxies appended theirs.
        assert_eq!(
            client(b"6.6.6.6, 198.51.100.7, 192.168.0.1"),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            client(b"6.6.6.6,198.51.100.7:4711"),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(client(b"[2001:db8::7]:4711"), Some(ip("2001:db8::7")));
        // Every hop trusted: the leftmost.
        assert_eq!(client(b"10.9.9.9, 192.168.0.1"), Some(ip("10.9.9.9")));
        // Garbage the client wrote left of its own address changes nothing.
        assert_eq!(
            client(b"garbage, \xff, 198.51.100.7"),
            Some(ip("198.51.100.7"))
        );
        // An unreadable hop before any untrusted one: nobody knows who is behind it, and it is
        // never the proxy.
        assert_eq!(client(b"198.51.100.7, garbage, 10.1.1.1"), None);
        assert_eq!(client(b"garbage"), None);
        assert_eq!(client(b"\xff"), None);
        assert_eq!(client(b""), None);
        assert_eq!(client(b"198.51.100.7,"), None);
        // No header: the peer.
        assert_eq!(proxies.client(peer, &parts(&[])), Some(peer));
        // Several header lines are one list, in order; a client's bad line does not hide the
        // proxy's clean one after it.
        let two = parts(&[
            ("x-forwarded-for", b"\xff\xfe"),
            ("x-forwarded-for", b"198.51.100.7"),
        ]);
        assert_eq!(proxies.client(peer, &two), Some(ip("198.51.100.7")));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let peer = ip("10.0.0.2");
        let both = parts(&[
            (
                "forwarded",
                b"for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.3",
            ),
            ("x-forwarded-for", b"198.51.100.7"),
        ]);
        let xff: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert_eq!(xff.client(peer, &both), Some(ip("198.51.100.7")));
        let only_forwarded = parts(&[("forwarded", b"for=203.0.113.1")]);
        assert_eq!(
            xff.client(peer, &only_forwarded),
            Some(peer),
            "a client's Forwarded is not read"
        );
        let fwd = xff.clone().header(ForwardedHeader::Forwarded);
        assert_eq!(fwd.client(peer, &both), Some(ip("2001:db8::7")));
        let hidden = parts(&[("forwarded", b"for=_hidden, for=198.51.100.7")]);
        assert_eq!(fwd.client(peer, &hidden), Some(ip("198.51.100.7")));
        assert_eq!(
            fwd.client(peer, &parts(&[("forwarded", b"for=unknown")])),
            None
        );
        assert_eq!(
            fwd.client(peer, &parts(&[("forwarded", b"by=10.0.0.9;proto=http")])),
            None
        );
        assert_eq!(
            fwd.client(peer, &parts(&[("x-forwarded-for", b"198.51.100.7")])),
            Some(peer),
            "an X-Forwarded-For is not read"
        );
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let proxies: TrustedProxies = "127.0.0.1".parse().unwrap();
        let peer = ip("::ffff:127.0.0.1");
        assert!(proxies.contains(peer));
        let request = parts(&[("x-forwarded-for", b"::ffff:198.51.100.7")]);
        assert_eq!(proxies.client(peer, &request), Some(ip("198.51.100.7")));
        // Networks written in the mapped form are IPv4 networks too.
        let ranges: IpRanges = "::ffff:10.0.0.0/104, ::ffff:127.0.0.1".parse().unwrap();
        assert!(ranges.contains(ip("10.2.3.4")));
        assert!(ranges.contains(ip("::ffff:10.2.3.4")));
        assert!(ranges.contains(ip("127.0.0.1")));
        assert!(!ranges.contains(ip("11.0.0.1")));
    }

    #[test]
    fn lists_parse_strictly() {
        assert!("".parse::<TrustedProxies>().unwrap().is_empty());
        let list: TrustedProxies = " 10.1.2.3/8 ,, ::1 ".parse().unwrap();
        assert!(list.contains(ip("10.200.0.1")), "host bits are dropped");
        assert!(list.contains(ip("::1")));
        for bad in [
            "10.0.0.0/33",
            "example.org",
            "10.0.0",
            "::1/129",
            "10.0.0.0/8/8",
        ] {
            assert_eq!(
                bad.parse::<IpRanges>(),
                Err(InvalidIpRanges(bad.to_owned())),
                "{bad}"
            );
        }
    }
}
