//! The client's address: the connection's peer, or, only when that peer is a trusted proxy, the
//! address the proxies reported in `Forwarded` or `X-Forwarded-For`.
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

/// The proxies whose `Forwarded` and `X-Forwarded-For` headers are believed
/// (`"10.0.0.0/8, ::1".parse()`, or [`TrustedProxies::new`] from [`IpRanges`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    ranges: IpRanges,
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
                    .map(|net| net.trunc())
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
    /// These proxies.
    pub fn new(ranges: IpRanges) -> Self {
        Self { ranges }
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
    /// hop of `Forwarded` (if the request has one) or `X-Forwarded-For` that is not a trusted
    /// proxy. A hop that is not an address (`unknown`, an obfuscated name) ends the walk: the
    /// client is then the last address a trusted proxy vouched for, never a word from the
    /// client. When every hop is trusted, the leftmost is the client.
    pub fn client(&self, peer: IpAddr, parts: &Parts) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut hops = Vec::new();
        if parts.headers.contains_key(FORWARDED) {
            for value in parts.headers.get_all(FORWARDED) {
                let Ok(value) = value.to_str() else {
                    return peer;
                };
                hops.extend(value.split(',').map(forwarded_for));
            }
        } else {
            for value in parts.headers.get_all(&X_FORWARDED_FOR) {
                let Ok(value) = value.to_str() else {
                    return peer;
                };
                hops.extend(value.split(',').map(|hop| parse_hop(hop.trim())));
            }
        }
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(addr) => {
                    client = addr;
                    if !self.contains(addr) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// The `for=` of one `Forwarded` element (RFC 7239), if it names an address.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_hop(value.trim().trim_matches('"')))?
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(canonical(addr));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(canonical)
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

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = http::Request::get("/x");
        for (name, value) in headers {
            request = request.header(*name, *value);
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
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        assert_eq!(
            proxies.client(ip("198.51.100.7"), &spoofed),
            ip("198.51.100.7")
        );
        assert_eq!(
            TrustedProxies::none().client(ip("10.0.0.1"), &spoofed),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_of_x_forwarded_for() {
        let proxies: TrustedProxies = "10.0.0.0/8, 192.168.0.1".parse().unwrap();
        let peer = ip("10.0.0.2");
        let client = |value: &str| proxies.client(peer, &parts(&[("x-forwarded-for", value)]));
        assert_eq!(client("198.51.100.7"), ip("198.51.100.7"));
        // The client wrote the leftmost entry; the proxies appended theirs.
        assert_eq!(
            client("6.6.6.6, 198.51.100.7, 192.168.0.1"),
            ip("198.51.100.7")
        );
        assert_eq!(client("6.6.6.6,198.51.100.7:4711"), ip("198.51.100.7"));
        // Every hop trusted: the leftmost.
        assert_eq!(client("10.9.9.9, 192.168.0.1"), ip("10.9.9.9"));
        // A hop that is no address ends the walk at the last vouched-for address.
        assert_eq!(client("198.51.100.7, garbage, 10.1.1.1"), ip("10.1.1.1"));
        assert_eq!(client("garbage"), peer);
        assert_eq!(client(""), peer);
        // No header: the peer.
        assert_eq!(proxies.client(peer, &parts(&[])), peer);
        // Several header lines are one list, in order.
        let two = parts(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(proxies.client(peer, &two), ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let peer = ip("10.0.0.2");
        let both = parts(&[
            (
                "forwarded",
                "for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.3",
            ),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(proxies.client(peer, &both), ip("2001:db8::7"));
        let obfuscated = parts(&[("forwarded", "for=_hidden, for=198.51.100.7")]);
        assert_eq!(proxies.client(peer, &obfuscated), ip("198.51.100.7"));
        let unknown = parts(&[("forwarded", "for=unknown")]);
        assert_eq!(proxies.client(peer, &unknown), peer);
        let by_only = parts(&[("forwarded", "by=10.0.0.9;proto=http")]);
        assert_eq!(proxies.client(peer, &by_only), peer);
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let proxies: TrustedProxies = "127.0.0.1".parse().unwrap();
        let peer = ip("::ffff:127.0.0.1");
        assert!(proxies.contains(peer));
        let request = parts(&[("x-forwarded-for", "::ffff:198.51.100.7")]);
        assert_eq!(proxies.client(peer, &request), ip("198.51.100.7"));
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
                bad.parse::<TrustedProxies>(),
                Err(InvalidIpRanges(bad.to_owned())),
                "{bad}"
            );
        }
    }
}
