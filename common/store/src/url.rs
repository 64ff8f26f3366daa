//! [`StoreUrl`]: which state store a coordinator uses, as written in its
//! `--store` flag, and [`parse_store_url`]. Opening the store it names is the
//! caller's business ([`super::EmbeddedStore::open`],
//! [`super::EtcdStore::connect`]).
//!
//! Accepted forms:
//! - `etcd://host:port[,host:port...]`: an etcd cluster over plain HTTP; the
//!   endpoints come back as `http://host:port`;
//! - `embedded:///absolute/path`, or a plain path with no `scheme://`: the
//!   embedded store at that path, as written.

use super::StoreError;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A parsed `--store` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store at this path.
    Embedded(PathBuf),
    /// etcd, at these endpoints (`http://host:port`, at least one).
    Etcd(Vec<String>),
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Embedded(path) => write!(f, "embedded://{}", path.display()),
            StoreUrl::Etcd(endpoints) => {
                let hosts: Vec<&str> = endpoints
                    .iter()
                    .map(|e| e.strip_prefix("http://").unwrap_or(e))
                    .collect();
                write!(f, "etcd://{}", hosts.join(","))
            }
        }
    }
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_store_url(s)
    }
}

/// Parses a `--store` value; see the module doc for the forms.
pub fn parse_store_url(url: &str) -> Result<StoreUrl, StoreError> {
    let invalid = |why: String| StoreError::InvalidRequest(format!("store url {url:?}: {why}"));
    if url.trim().is_empty() {
        return Err(invalid("is empty".to_owned()));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(StoreUrl::Embedded(PathBuf::from(url)));
    };
    match scheme {
        "embedded" => {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "an embedded store needs an absolute path (embedded:///path) or a plain path"
                        .to_owned(),
                ));
            }
            Ok(StoreUrl::Embedded(PathBuf::from(rest)))
        }
        "etcd" => {
            let mut endpoints = Vec::new();
            for host_port in rest.split(',') {
                endpoints.push(parse_endpoint(host_port).map_err(invalid)?);
            }
            Ok(StoreUrl::Etcd(endpoints))
        }
        other => Err(invalid(format!(
            "unknown scheme {other:?}, expected etcd:// or embedded://"
        ))),
    }
}

/// `host:port` -> `http://host:port`, refusing anything else (paths, users,
/// empty hosts, ports that are not 1..=65535).
fn parse_endpoint(host_port: &str) -> Result<String, String> {
    let host_port = host_port.trim();
    if host_port.is_empty() {
        return Err("an etcd endpoint is empty".to_owned());
    }
    if host_port.contains(['/', '@', '?', '#', ' ']) {
        return Err(format!("etcd endpoint {host_port:?} is not host:port"));
    }
    let Some((host, port)) = host_port.rsplit_once(':') else {
        return Err(format!("etcd endpoint {host_port:?} has no port"));
    };
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || (host.contains(':') && !bracketed) {
        return Err(format!(
            "etcd endpoint {host_port:?} has no valid host (write IPv6 addresses in brackets)"
        ));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(format!("http://{host}:{port}")),
        _ => Err(format!("etcd endpoint {host_port:?} has an invalid port")),
    }
}
