//! Load targets: the server URLs, restricted to loopback, and the loopback
//! source addresses that client sockets bind to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use url::{Host, Url};

use crate::cli::Protocol;

/// One server to connect to: the WebSocket URL of its endpoint for the
/// chosen protocol and the socket address it resolves to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The WebSocket URL that the handshake requests.
    pub endpoint: String,
    /// The server's address; never looked up in DNS, so only literal
    /// loopback addresses and `localhost` (taken as 127.0.0.1) are accepted.
    pub addr: SocketAddr,
}

/// Parses a server URL and checks that it names a loopback address.
///
/// Accepted schemes are `ws` and `http` (the same server; TLS is not
/// supported). A URL without a path gets the protocol's endpoint: `/ws` for
/// native clients, `/socket.io/` for Socket.IO. Socket.IO URLs always get
/// the Engine.IO v4 WebSocket query (`EIO=4&transport=websocket`).
pub fn parse_target(text: &str, protocol: Protocol) -> Result<Target> {
    let mut url = Url::parse(text).with_context(|| format!("invalid target URL {text:?}"))?;
    let default_port = match url.scheme() {
        "ws" | "http" => 80,
        "wss" | "https" => bail!(
            "target URL {text:?} uses TLS, which nexus-load does not support; use ws:// or http://"
        ),
        other => bail!("target URL {text:?} has scheme {other:?}; use ws:// or http://"),
    };
    let ip = loopback_ip(&url).with_context(|| {
        format!(
            "target URL {text:?} is not a loopback address; nexus-load only connects to \
             127.0.0.0/8, ::1 or localhost"
        )
    })?;
    let port = url.port().unwrap_or(default_port);
    url.set_scheme("ws")
        .map_err(|()| anyhow::anyhow!("cannot use scheme ws for {text:?}"))?;
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(match protocol {
            Protocol::Native => "/ws",
            Protocol::Socketio => "/socket.io/",
        });
    }
    if protocol == Protocol::Socketio {
        url.set_query(Some("EIO=4&transport=websocket"));
    }
    Ok(Target {
        endpoint: url.to_string(),
        addr: SocketAddr::new(ip, port),
    })
}

/// Returns the loopback address that the URL's host names, or `None` when
/// the host is anything else. `localhost` maps to 127.0.0.1 without a DNS
/// lookup, so a resolver or hosts file cannot point it elsewhere.
fn loopback_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(ip) if ip.is_loopback() => Some(IpAddr::V4(ip)),
        Host::Ipv6(ip) if ip == Ipv6Addr::LOCALHOST => Some(IpAddr::V6(ip)),
        Host::Domain(name) if name.eq_ignore_ascii_case("localhost") => {
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        _ => None,
    }
}

/// Lists the source addresses for client sockets: 127.0.0.1 up to
/// 127.0.0.COUNT. Linux routes all of 127.0.0.0/8 to the loopback device,
/// and every source address has its own ephemeral port range, so COUNT
/// addresses allow about COUNT times as many sockets to one server port.
pub fn source_addresses(count: u8) -> Vec<IpAddr> {
    (1..=count)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect()
}

/// Picks the source address for the connection with this ordinal: one of
/// `sources` when the target is IPv4, none (the kernel's choice, ::1) when
/// it is IPv6.
pub fn source_for(sources: &[IpAddr], target: &Target, ordinal: u64) -> Option<IpAddr> {
    if !target.addr.is_ipv4() || sources.is_empty() {
        return None;
    }
    let index = usize::try_from(ordinal % sources.len() as u64).unwrap_or(0);
    sources.get(index).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_hosts() {
        for url in [
            "ws://127.0.0.1:3000",
            "ws://127.1.2.3:3000/ws",
            "http://localhost:3000",
            "ws://LOCALHOST:3000",
            "ws://[::1]:3000",
        ] {
            assert!(
                parse_target(url, Protocol::Native).is_ok(),
                "{url} rejected"
            );
        }
    }

    #[test]
    fn rejects_other_hosts() {
        for url in [
            "ws://10.0.0.1:3000",
            "ws://192.168.1.10:3000",
            "ws://0.0.0.0:3000",
            "ws://[::]:3000",
            "ws://[::ffff:127.0.0.1]:3000",
            "ws://example.com:3000",
            "ws://localhost.example.com:3000",
            "ws://169.254.169.254/",
        ] {
            let error = parse_target(url, Protocol::Native).expect_err(url);
            assert!(
                format!("{error:#}").contains("not a loopback address"),
                "{url}: {error:#}"
            );
        }
    }

    #[test]
    fn rejects_tls_and_other_schemes() {
        assert!(parse_target("wss://127.0.0.1:3000", Protocol::Native).is_err());
        assert!(parse_target("ftp://127.0.0.1:3000", Protocol::Native).is_err());
    }

    #[test]
    fn native_endpoint_defaults_to_ws_path() {
        let target = parse_target("http://localhost:3100", Protocol::Native).expect("valid");
        assert_eq!(target.endpoint, "ws://localhost:3100/ws");
        assert_eq!(target.addr, "127.0.0.1:3100".parse().expect("address"));
    }

    #[test]
    fn socketio_endpoint_has_engine_io_query() {
        let target = parse_target("ws://127.0.0.1:3900", Protocol::Socketio).expect("valid");
        assert_eq!(
            target.endpoint,
            "ws://127.0.0.1:3900/socket.io/?EIO=4&transport=websocket"
        );
    }

    #[test]
    fn explicit_path_is_kept() {
        let target = parse_target("ws://127.0.0.1:3000/chat", Protocol::Native).expect("valid");
        assert_eq!(target.endpoint, "ws://127.0.0.1:3000/chat");
    }

    #[test]
    fn sources_rotate_for_ipv4_only() {
        let sources = source_addresses(3);
        let v4 = parse_target("ws://127.0.0.1:1", Protocol::Native).expect("valid");
        let v6 = parse_target("ws://[::1]:1", Protocol::Native).expect("valid");
        assert_eq!(
            source_for(&sources, &v4, 4),
            Some("127.0.0.2".parse().expect("ip"))
        );
        assert_eq!(source_for(&sources, &v6, 4), None);
    }
}
