//! Checks of `allowed_outbound_hosts` for the Redis and Postgres addresses a
//! component opens.

use anyhow::{bail, Context};

/// One entry of `allowed_outbound_hosts`: a scheme, a host and a port, each
/// of which may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    scheme: String,
    host: String,
    port: Option<String>,
}

impl AllowedHost {
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = entry
            .split_once("://")
            .with_context(|| format!("allowed host {entry:?} has no scheme"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = split_host_port(rest);
        if host.is_empty() {
            bail!("allowed host {entry:?} has no host");
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            port: port.map(str::to_string),
        })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let scheme_ok = self.scheme == "*" || self.scheme == scheme;
        let host_ok = self.host == "*" || self.host == host;
        let port_ok = match &self.port {
            Some(allowed) => allowed == "*" || allowed.parse::<u16>() == Ok(port),
            None => default_port(scheme) == Some(port),
        };
        scheme_ok && host_ok && port_ok
    }
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    // Bracketed IPv6 literal: [::1]:6379
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "redis" | "rediss" => Some(6379),
        "postgres" | "postgresql" => Some(5432),
        _ => None,
    }
}

/// Returns the host and port of a `redis://` or `postgres://` URL, with the
/// scheme's default port when the URL names none.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit('@').next()?;
    let (host, port) = split_host_port(authority);
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default_port(&scheme.to_ascii_lowercase())?,
    };
    Some((host.to_string(), port))
}

/// The allowed hosts of one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allowed: Vec<AllowedHost>,
}

impl OutboundPolicy {
    pub fn new(entries: &[String]) -> anyhow::Result<Self> {
        let allowed = entries
            .iter()
            .map(|entry| AllowedHost::parse(entry))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { allowed })
    }

    /// Checks a connection URL (`redis://...` or `postgres://...`) against the
    /// policy and returns a reason when it is not allowed.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "address is not a URL with a scheme".to_string())?;
        let scheme = scheme.to_ascii_lowercase();
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let authority = authority.rsplit('@').next().unwrap_or_default();
        let (host, port) = split_host_port(authority);
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| format!("invalid port {port:?}"))?,
            None => default_port(&scheme).ok_or_else(|| format!("unknown scheme {scheme}"))?,
        };
        let host = host.to_ascii_lowercase();
        let scheme_for_match = match scheme.as_str() {
            "postgresql" => "postgres",
            other => other,
        };
        if self
            .allowed
            .iter()
            .any(|allowed| allowed.allows(scheme_for_match, &host, port))
        {
            Ok(())
        } else {
            Err(format!(
                "{scheme}://{host}:{port} is not in the component's allowed_outbound_hosts"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OutboundPolicy {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        OutboundPolicy::new(&entries).unwrap()
    }

    #[test]
    fn allows_listed_redis_host() {
        let policy = policy(&["redis://127.0.0.1:6379"]);
        assert!(policy.check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(policy.check_url("redis://:secret@127.0.0.1:6379").is_ok());
    }

    #[test]
    fn rejects_other_port_host_and_scheme() {
        let policy = policy(&["redis://127.0.0.1:6379"]);
        assert!(policy.check_url("redis://127.0.0.1:6380").is_err());
        assert!(policy.check_url("redis://10.0.0.1:6379").is_err());
        assert!(policy.check_url("postgres://127.0.0.1:6379").is_err());
    }

    #[test]
    fn postgresql_scheme_matches_postgres_entry() {
        let policy = policy(&["postgres://localhost:5432"]);
        assert!(policy
            .check_url("postgresql://postgres@localhost:5432/nexus_chat")
            .is_ok());
        assert!(policy.check_url("postgres://localhost/nexus_chat").is_ok());
    }

    #[test]
    fn wildcard_port_and_ipv6() {
        let policy = policy(&["redis://[::1]:*"]);
        assert!(policy.check_url("redis://[::1]:7000").is_ok());
        assert!(policy.check_url("redis://127.0.0.1:7000").is_err());
    }
}
