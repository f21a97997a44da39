//! Certificates and upstream TLS on the wire. Decoding re-checks every PEM and key pair: an
//! agent never serves a certificate it has not verified itself.

use std::collections::{BTreeMap, HashSet};

use super::{WireError, invalid};
use crate::config::model::{
    Certificate, HostPattern, PemFile, TlsVersion, UpstreamTls, is_dns_name,
};
use crate::config::pem;
use crate::v1;

fn pem_to_wire(f: &PemFile) -> v1::PemFile {
    v1::PemFile {
        path: f.path.clone(),
        content: f.content.clone(),
    }
}

fn pem_from_wire(f: Option<v1::PemFile>, what: &str, field: &str) -> Result<PemFile, WireError> {
    let f = f.ok_or_else(|| invalid(what, format!("no {field}")))?;
    Ok(PemFile {
        path: f.path,
        content: f.content,
    })
}

pub(super) fn certificate_to_wire(c: &Certificate) -> v1::Certificate {
    v1::Certificate {
        name: c.name.clone(),
        hosts: c.hosts.iter().map(ToString::to_string).collect(),
        cert: Some(pem_to_wire(&c.cert)),
        key: Some(pem_to_wire(&c.key)),
        default: c.default,
        client_ca: c.client_ca.as_ref().map(pem_to_wire),
        min_version: match c.min_version {
            TlsVersion::V1_2 => v1::TlsVersion::TlsVersion12,
            TlsVersion::V1_3 => v1::TlsVersion::TlsVersion13,
        } as i32,
    }
}

pub(super) fn certificates_from_wire(
    certs: Vec<v1::Certificate>,
) -> Result<BTreeMap<String, Certificate>, WireError> {
    let mut out = BTreeMap::new();
    let mut hosts_seen = HashSet::new();
    let mut has_default = false;
    for c in certs {
        let what = format!("certificate {:?}", c.name);
        let mut hosts = Vec::new();
        for h in &c.hosts {
            let p = HostPattern::parse(h).map_err(|m| invalid(&what, m))?;
            if p == HostPattern::Any {
                return Err(invalid(&what, "host \"*\""));
            }
            if !hosts_seen.insert(p.clone()) {
                return Err(invalid(&what, format!("host {p} listed twice")));
            }
            hosts.push(p);
        }
        if c.default {
            if has_default {
                return Err(invalid(&what, "a second default certificate"));
            }
            has_default = true;
        }
        let cert = pem_from_wire(c.cert, &what, "certificate")?;
        let key = pem_from_wire(c.key, &what, "key")?;
        pem::certified_key(&cert.content, &key.content).map_err(|m| invalid(&what, m))?;
        let client_ca = match c.client_ca {
            Some(f) => {
                pem::root_store(&f.content).map_err(|m| invalid(&what, m))?;
                Some(pem_from_wire(Some(f), &what, "client CA")?)
            }
            None => None,
        };
        let min_version = match v1::TlsVersion::try_from(c.min_version) {
            Ok(v1::TlsVersion::TlsVersion12) => TlsVersion::V1_2,
            Ok(v1::TlsVersion::TlsVersion13) => TlsVersion::V1_3,
            Err(_) => return Err(invalid(&what, "unknown TLS version")),
        };
        if out.contains_key(&c.name) {
            return Err(invalid(&what, "listed twice"));
        }
        out.insert(
            c.name.clone(),
            Certificate {
                name: c.name,
                hosts,
                cert,
                key,
                default: c.default,
                client_ca,
                min_version,
            },
        );
    }
    Ok(out)
}

pub(super) fn upstream_tls_to_wire(t: &UpstreamTls) -> v1::UpstreamTls {
    v1::UpstreamTls {
        sni: t.sni.clone().unwrap_or_default(),
        ca: t.ca.as_ref().map(pem_to_wire),
        insecure_skip_verify: t.insecure_skip_verify,
        client_cert: t.client_cert.as_ref().map(|(c, _)| pem_to_wire(c)),
        client_key: t.client_cert.as_ref().map(|(_, k)| pem_to_wire(k)),
    }
}

pub(super) fn upstream_tls_from_wire(
    t: v1::UpstreamTls,
    what: &str,
) -> Result<UpstreamTls, WireError> {
    let sni = if t.sni.is_empty() {
        None
    } else if is_dns_name(&t.sni) || t.sni.parse::<std::net::IpAddr>().is_ok() {
        Some(t.sni)
    } else {
        return Err(invalid(what, format!("invalid sni {:?}", t.sni)));
    };
    let ca = match t.ca {
        Some(f) => {
            pem::root_store(&f.content).map_err(|m| invalid(what, format!("ca: {m}")))?;
            Some(pem_from_wire(Some(f), what, "ca")?)
        }
        None if t.insecure_skip_verify => None,
        None => {
            return Err(invalid(
                what,
                "TLS without a CA and without insecure_skip_verify",
            ));
        }
    };
    let client_cert = match (t.client_cert, t.client_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            pem::certified_key(&c.content, &k.content)
                .map_err(|m| invalid(what, format!("client certificate: {m}")))?;
            Some((
                pem_from_wire(Some(c), what, "client certificate")?,
                pem_from_wire(Some(k), what, "client key")?,
            ))
        }
        _ => return Err(invalid(what, "a client certificate without its key")),
    };
    Ok(UpstreamTls {
        sni,
        ca,
        insecure_skip_verify: t.insecure_skip_verify,
        client_cert,
    })
}
