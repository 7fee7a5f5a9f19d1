//! PROXY protocol headers, versions 1 and 2 (HAProxy's `proxy-protocol.txt`): the header
//! an agent sends a backend before the first byte of a stream, and the parsing of the
//! header a trusted load balancer sends a public listener. Pure and bounded; the wire format itself is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;
use serde::Deserialize;

/// Longest header accepted from a load balancer: v1 is at most 107 bytes; v2 is 16 plus
/// its addresses and TLVs, which a load balancer keeps small (its SSL and unique-id TLVs
/// come to a few hundred bytes).
pub const MAX_HEADER: usize = 4096;
/// The v2 TLV type carrying the calling agent's SPIFFE identity on a mesh stream (in the
/// range the specification leaves to applications, 0xE0 to 0xEF).
pub const TLV_CALLER: u8 = 0xE0;
/// The v2 TLV type carrying the name that routed the connection (the specification's
/// `PP2_TYPE_AUTHORITY`).
pub const TLV_AUTHORITY: u8 = 0x02;
/// The v2 TLV types of a connection whose TLS the proxy terminated: the protocol the
/// client and the proxy agreed on (`PP2_TYPE_ALPN`), and the TLS facts (`PP2_TYPE_SSL`,
/// with its `PP2_SUBTYPE_SSL_VERSION`), as HAProxy sends them.
pub const TLV_ALPN: u8 = 0x01;
pub const TLV_SSL: u8 = 0x20;
pub const TLV_SSL_VERSION: u8 = 0x21;
/// `PP2_CLIENT_SSL`: the client connected over TLS (no client certificate was asked).
const PP2_CLIENT_SSL: u8 = 0x01;
/// Longest value of a TLV revproxy writes.
const MAX_TLV: usize = 1024;
/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;

/// Which header a backend wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header: addresses only.
    V1,
    /// The binary header: addresses, and TLVs with the routed name and the caller.
    V2,
}

/// Where a connection came from and went to, and what routed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The client's address.
    pub client: Option<SocketAddr>,
    /// The address the client connected to (the proxy's public listener).
    pub server: Option<SocketAddr>,
    /// The name that routed the connection (SNI or `Host`, or the listener's target).
    pub name: Option<String>,
    /// On a mesh stream, the calling agent's SPIFFE identity.
    pub caller: Option<String>,
    /// When the proxy terminated the client's TLS: what was agreed.
    pub tls: Option<TlsFacts>,
}

/// The TLS a client spoke with the proxy, when the proxy terminated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFacts {
    /// `TLSv1.3` or `TLSv1.2` (OpenSSL's spelling, as HAProxy sends it).
    pub version: String,
    /// The application protocol agreed by ALPN (`http/1.1`), if any.
    pub alpn: Option<String>,
}

impl TlsFacts {
    /// The `PP2_TYPE_SSL` value: client flags, verify result (0: no client certificate
    /// failed, as none was asked), then the version sub-TLV.
    fn ssl_tlv(&self) -> Vec<u8> {
        let version = &self.version.as_bytes()[..self.version.len().min(64)];
        let mut value = vec![PP2_CLIENT_SSL, 0, 0, 0, 0, TLV_SSL_VERSION];
        value.extend_from_slice(&(version.len() as u16).to_be_bytes());
        value.extend_from_slice(version);
        value
    }
}

/// The header to send for `origin`. Without both addresses it says so (v1 `UNKNOWN`, v2
/// `LOCAL`), and the backend uses the connection's own addresses. An IPv4 address beside
/// an IPv6 one is sent IPv4-mapped.
pub fn encode(version: ProxyProtocol, origin: &Origin) -> Vec<u8> {
    // An IPv4 client of a dual-stack listener arrives IPv4-mapped: sent as IPv4.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let pair = match (origin.client.map(canonical), origin.server.map(canonical)) {
        (Some(client), Some(server)) => Some(same_family(client, server)),
        _ => None,
    };
    match version {
        ProxyProtocol::V1 => {
            let addresses = match pair {
                Some((SocketAddr::V4(c), SocketAddr::V4(s))) => {
                    ppp::v1::Addresses::new_tcp4(*c.ip(), *s.ip(), c.port(), s.port())
                }
                Some((SocketAddr::V6(c), SocketAddr::V6(s))) => {
                    ppp::v1::Addresses::new_tcp6(*c.ip(), *s.ip(), c.port(), s.port())
                }
                _ => ppp::v1::Addresses::Unknown,
            };
            addresses.to_string().into_bytes()
        }
        ProxyProtocol::V2 => {
            let builder = match pair {
                Some(pair) => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    pair,
                ),
                None => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Local,
                    v2::Protocol::Unspecified,
                    v2::Addresses::Unspecified,
                ),
            };
            let mut tlvs: Vec<(u8, &[u8])> = Vec::new();
            let ssl = origin.tls.as_ref().map(TlsFacts::ssl_tlv);
            if let Some(alpn) = origin.tls.as_ref().and_then(|t| t.alpn.as_ref()) {
                tlvs.push((TLV_ALPN, alpn.as_bytes()));
            }
            if let Some(name) = &origin.name {
                tlvs.push((TLV_AUTHORITY, name.as_bytes()));
            }
            if let Some(ssl) = &ssl {
                tlvs.push((TLV_SSL, ssl));
            }
            if let Some(caller) = &origin.caller {
                tlvs.push((TLV_CALLER, caller.as_bytes()));
            }
            let mut builder = builder;
            for (kind, value) in tlvs {
                // Names (253 bytes) and identities are far shorter; the cap keeps the
                // header's 16-bit length safe whatever comes.
                builder = builder
                    .write_tlv(kind, &value[..value.len().min(MAX_TLV)])
                    .expect("writing to memory");
            }
            builder.build().expect("writing to memory")
        }
    }
}

/// The two addresses in one family: IPv4 made IPv4-mapped IPv6 when the other is IPv6.
fn same_family(client: SocketAddr, server: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if client.is_ipv4() == server.is_ipv4() {
        (client, server)
    } else {
        (v6(client), v6(server))
    }
}

/// What the start of a connection from a trusted load balancer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A header of `len` bytes; the client it names, if it names one (v1 `UNKNOWN` and v2
    /// `LOCAL` do not: the load balancer's own connection, a health check).
    Header {
        client: Option<SocketAddr>,
        server: Option<SocketAddr>,
        len: usize,
    },
    /// Not a PROXY header, or a malformed one.
    Invalid(String),
}

/// Parses the PROXY header at the start of `buf`, v1 or v2.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    // Both signatures are known from their first bytes: anything else is no header.
    const V1: &[u8] = b"PROXY ";
    const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let prefix = |sig: &[u8]| buf[..buf.len().min(sig.len())] == sig[..buf.len().min(sig.len())];
    if !prefix(V1) && !prefix(V2) {
        return Parsed::Invalid("the connection does not start with a PROXY header".into());
    }
    let too_long = || Parsed::Invalid(format!("no complete PROXY header in {MAX_HEADER} bytes"));
    if prefix(V1) {
        // A v1 header is one line of at most 107 bytes: framed here, parsed whole.
        let window = &buf[..buf.len().min(V1_MAX)];
        let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
            return if window.len() >= V1_MAX {
                Parsed::Invalid(format!("no PROXY v1 line end in {V1_MAX} bytes"))
            } else {
                Parsed::Incomplete
            };
        };
        let line = &buf[..end + 2];
        return match ppp::v1::Header::try_from(line) {
            Ok(header) => {
                let (client, server) = match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    ppp::v1::Addresses::Tcp6(a) => (
                        Some(SocketAddr::from((a.source_address, a.source_port))),
                        Some(SocketAddr::from((
                            a.destination_address,
                            a.destination_port,
                        ))),
                    ),
                    ppp::v1::Addresses::Unknown => (None, None),
                };
                Parsed::Header {
                    client,
                    server,
                    len: line.len(),
                }
            }
            Err(e) => Parsed::Invalid(format!("bad PROXY v1 header: {e}")),
        };
    }
    let window = &buf[..buf.len().min(MAX_HEADER)];
    match ppp::HeaderResult::parse(window) {
        // v1 is framed above; only v2 gets here.
        ppp::HeaderResult::V1(_) => Parsed::Invalid("not a PROXY v2 header".into()),
        ppp::HeaderResult::V2(Ok(header)) => {
            let (client, server) = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                _ => (None, None),
            };
            Parsed::Header {
                client,
                server,
                len: header.len(),
            }
        }
        result if ppp::PartialResult::is_incomplete(&result) => {
            if window.len() >= MAX_HEADER {
                too_long()
            } else {
                Parsed::Incomplete
            }
        }
        ppp::HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("bad PROXY v2 header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            client: Some("203.0.113.7:51234".parse().unwrap()),
            server: Some("198.51.100.1:443".parse().unwrap()),
            name: Some("app.example.com".into()),
            caller: Some("spiffe://revproxy.local/agent/laptop".into()),
            tls: None,
        }
    }

    /// A terminated connection's TLS facts ride as HAProxy sends them: the ALPN TLV, and
    /// the SSL TLV (client over TLS, verify 0) with its version sub-TLV.
    #[test]
    fn v2_carries_the_tls_facts() {
        let terminated = Origin {
            tls: Some(TlsFacts {
                version: "TLSv1.3".into(),
                alpn: Some("http/1.1".into()),
            }),
            ..origin()
        };
        let header = encode(ProxyProtocol::V2, &terminated);
        let parsed = v2::Header::try_from(&header[..]).unwrap();
        let tlvs: Vec<(u8, Vec<u8>)> = (parsed.tlvs())
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        assert!(tlvs.contains(&(TLV_ALPN, b"http/1.1".to_vec())), "{tlvs:?}");
        let ssl = &tlvs.iter().find(|(k, _)| *k == TLV_SSL).unwrap().1;
        assert_eq!(ssl[0], PP2_CLIENT_SSL);
        assert_eq!(&ssl[1..5], &[0, 0, 0, 0]);
        assert_eq!(&ssl[5..8], &[TLV_SSL_VERSION, 0, 7]);
        assert_eq!(&ssl[8..], b"TLSv1.3");
        // Not terminated: neither TLV.
        let plain = encode(ProxyProtocol::V2, &origin());
        let parsed = v2::Header::try_from(&plain[..]).unwrap();
        assert!(parsed
            .tlvs()
            .all(|t| !matches!(t.unwrap().kind, TLV_ALPN | TLV_SSL)));
    }

    /// What we send parses back to the same addresses, with any bytes after it, and on
    /// every prefix the parser asks for more rather than guessing.
    #[test]
    fn round_trips_and_prefixes() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = encode(version, &origin());
            let mut stream = header.clone();
            stream.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(
                parse(&stream),
                Parsed::Header {
                    client: origin().client,
                    server: origin().server,
                    len: header.len()
                },
                "{version:?}"
            );
            for cut in 0..header.len() {
                assert_eq!(
                    parse(&header[..cut]),
                    Parsed::Incomplete,
                    "{version:?} at {cut}"
                );
            }
        }
        assert_eq!(
            String::from_utf8(encode(ProxyProtocol::V1, &origin())).unwrap(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 51234 443\r\n"
        );
    }

    /// v2 carries the routed name and the caller as TLVs, where HAProxy and nginx read them.
    #[test]
    fn v2_carries_the_name_and_the_caller() {
        let header = encode(ProxyProtocol::V2, &origin());
        let parsed = v2::Header::try_from(&header[..]).unwrap();
        let tlvs: Vec<(u8, Vec<u8>)> = parsed
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        assert!(tlvs.contains(&(TLV_AUTHORITY, b"app.example.com".to_vec())));
        assert!(tlvs.contains(&(TLV_CALLER, b"spiffe://revproxy.local/agent/laptop".to_vec())));
    }

    /// Without the addresses: UNKNOWN / LOCAL, which parse as "no client".
    #[test]
    fn unknown_addresses_and_mixed_families() {
        let unknown = Origin::default();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = encode(version, &unknown);
            assert!(matches!(
                parse(&header),
                Parsed::Header { client: None, .. }
            ));
        }
        let mixed = Origin {
            client: Some("[2001:db8::1]:4000".parse().unwrap()),
            server: Some("198.51.100.1:443".parse().unwrap()),
            ..Origin::default()
        };
        let dual_stack = Origin {
            client: Some("[::ffff:203.0.113.7]:4000".parse().unwrap()),
            server: Some("198.51.100.1:443".parse().unwrap()),
            ..Origin::default()
        };
        assert_eq!(
            String::from_utf8(encode(ProxyProtocol::V1, &dual_stack)).unwrap(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 4000 443\r\n",
            "an IPv4-mapped client is sent as IPv4"
        );
        let header = encode(ProxyProtocol::V1, &mixed);
        assert!(String::from_utf8(header)
            .unwrap()
            .starts_with("PROXY TCP6 2001:db8::1 ::ffff:198.51.100.1 "));
    }

    /// A plain client, garbage and endless headers are refused, never waited on forever.
    #[test]
    fn refusals() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"\x16\x03\x01"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 nonsense\r\n"),
            Parsed::Invalid(_)
        ));
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; MAX_HEADER]].concat();
        assert!(matches!(parse(&endless), Parsed::Invalid(_)));
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
        v2.extend(std::iter::repeat_n(0u8, MAX_HEADER));
        assert!(matches!(parse(&v2), Parsed::Invalid(_)));
    }
}
