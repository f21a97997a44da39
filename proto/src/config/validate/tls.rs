//! `[certificates.NAME]` and upstream `tls`: uploaded files, PEM parsing, key/certificate
//! pairs, SNI host rules.

use std::collections::{BTreeMap, HashMap};

use toml::Spanned;

use super::Validator;
use crate::config::model::{
    Certificate, HostPattern, PemFile, TlsVersion, UpstreamTls, is_dns_name,
};
use crate::config::pem;
use crate::config::raw::{RawCertificate, RawUpstreamTls};

impl Validator<'_> {
    /// An uploaded file by the path the config writes.
    fn file(&mut self, path: &Spanned<String>, key: &str) -> Option<PemFile> {
        match self.files.get(path.get_ref()) {
            Some(content) => Some(PemFile {
                path: path.get_ref().clone(),
                content: content.clone(),
            }),
            None => {
                self.err(
                    path,
                    key,
                    format!(
                        "file {:?} was not uploaded (dispactl apply uploads the files a routes.toml names, read relative to it)",
                        path.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A certificate chain file that parses.
    fn chain_file(&mut self, path: &Spanned<String>, key: &str) -> Option<PemFile> {
        let f = self.file(path, key)?;
        match pem::certificates(&f.content) {
            Ok(_) => Some(f),
            Err(m) => {
                self.err(path, key, format!("{:?}: {m}", f.path));
                None
            }
        }
    }

    /// A CA bundle file whose certificates all parse.
    fn ca_file(&mut self, path: &Spanned<String>, key: &str) -> Option<PemFile> {
        let f = self.file(path, key)?;
        match pem::root_store(&f.content) {
            Ok(_) => Some(f),
            Err(m) => {
                self.err(path, key, format!("{:?}: {m}", f.path));
                None
            }
        }
    }

    /// A private key file that parses and belongs to `cert`.
    fn key_file(
        &mut self,
        path: &Spanned<String>,
        key: &str,
        cert: Option<&PemFile>,
    ) -> Option<PemFile> {
        let f = self.file(path, key)?;
        if let Err(m) = pem::private_key(&f.content) {
            self.err(path, key, format!("{:?}: {m}", f.path));
            return None;
        }
        let cert = cert?;
        match pem::certified_key(&cert.content, &f.content) {
            Ok(_) => Some(f),
            Err(m) => {
                self.err(path, key, format!("{:?} with {:?}: {m}", f.path, cert.path));
                None
            }
        }
    }

    pub(super) fn certificates(
        &mut self,
        raw: BTreeMap<Spanned<String>, Spanned<RawCertificate>>,
    ) -> BTreeMap<String, Certificate> {
        let mut out = BTreeMap::new();
        // Host -> the entry that listed it first.
        let mut owners: HashMap<HostPattern, String> = HashMap::new();
        let mut default: Option<String> = None;
        for (name, c) in raw {
            let key = format!("certificates.{}", name.get_ref());
            self.check_name(&name, &key, "certificate");
            let raw = c.get_ref();
            let mut hosts = Vec::new();
            for (i, h) in raw.hosts.iter().enumerate() {
                let hkey = format!("{key}.hosts[{i}]");
                match HostPattern::parse(h.get_ref()) {
                    Ok(HostPattern::Any) => self.err(
                        h,
                        &hkey,
                        "\"*\" is not a certificate host: set default = true to serve this certificate to any other name",
                    ),
                    Ok(p) => {
                        if let Some(other) = owners.get(&p) {
                            let m = if other == name.get_ref() {
                                format!("duplicate host {p}")
                            } else {
                                format!("host {p} is already served by certificates.{other}")
                            };
                            self.err(h, &hkey, m);
                        } else {
                            owners.insert(p.clone(), name.get_ref().clone());
                            hosts.push(p);
                        }
                    }
                    Err(m) => self.err(h, &hkey, m),
                }
            }
            let is_default = raw.default.unwrap_or(false);
            if is_default {
                if let Some(other) = &default {
                    self.err(
                        &c,
                        &format!("{key}.default"),
                        format!("certificates.{other} is already the default; at most one certificate may be"),
                    );
                } else {
                    default = Some(name.get_ref().clone());
                }
            }
            if raw.hosts.is_empty() && !is_default {
                self.err(
                    &c,
                    &format!("{key}.hosts"),
                    "a certificate needs hosts, or default = true",
                );
            }
            let min_version = match &raw.min_version {
                None => TlsVersion::default(),
                Some(v) => TlsVersion::parse(v.get_ref()).unwrap_or_else(|m| {
                    self.err(v, &format!("{key}.min_version"), m);
                    TlsVersion::default()
                }),
            };
            let cert = self.chain_file(&raw.cert_file, &format!("{key}.cert_file"));
            let pkey = self.key_file(&raw.key_file, &format!("{key}.key_file"), cert.as_ref());
            let client_ca = match &raw.client_ca_file {
                Some(p) => match self.ca_file(p, &format!("{key}.client_ca_file")) {
                    Some(f) => Some(f),
                    None => continue,
                },
                None => None,
            };
            let (Some(cert), Some(pkey)) = (cert, pkey) else {
                continue;
            };
            out.insert(
                name.get_ref().clone(),
                Certificate {
                    name: name.into_inner(),
                    hosts,
                    cert,
                    key: pkey,
                    default: is_default,
                    client_ca,
                    min_version,
                },
            );
        }
        out
    }

    pub(super) fn upstream_tls(
        &mut self,
        t: &Spanned<RawUpstreamTls>,
        key: &str,
    ) -> Option<UpstreamTls> {
        let raw = t.get_ref();
        let sni = raw.sni.as_ref().and_then(|s| {
            let v = s.get_ref().to_ascii_lowercase();
            if is_dns_name(&v) || v.parse::<std::net::IpAddr>().is_ok() {
                Some(v.trim_end_matches('.').to_string())
            } else {
                self.err(
                    s,
                    &format!("{key}.sni"),
                    format!("sni {v:?} is neither a DNS name nor an IP address"),
                );
                None
            }
        });
        let insecure = raw.insecure_skip_verify.unwrap_or(false);
        let ca = match (&raw.ca_file, insecure) {
            (Some(p), false) => Some(self.ca_file(p, &format!("{key}.ca_file"))?),
            (Some(p), true) => {
                self.err(
                    p,
                    &format!("{key}.ca_file"),
                    "ca_file and insecure_skip_verify = true contradict each other",
                );
                return None;
            }
            (None, true) => None,
            (None, false) => {
                self.err(
                    t,
                    key,
                    "upstream TLS needs ca_file (agents trust no system roots), or insecure_skip_verify = true",
                );
                return None;
            }
        };
        let client_cert = match (&raw.cert_file, &raw.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                let cert = self.chain_file(c, &format!("{key}.cert_file"));
                let pkey = self.key_file(k, &format!("{key}.key_file"), cert.as_ref());
                Some((cert?, pkey?))
            }
            (Some(p), None) | (None, Some(p)) => {
                self.err(p, key, "cert_file and key_file go together");
                return None;
            }
        };
        Some(UpstreamTls {
            sni,
            ca,
            insecure_skip_verify: insecure,
            client_cert,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::config::{Attachments, parse_with_files, referenced_files};

    struct Pki {
        ca_pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = params.self_signed(&key).unwrap();
            Self {
                ca_pem: ca.pem(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// (chain PEM, key PEM)
        fn leaf(&self, host: &str) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![host.to_string()])
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    fn files(list: &[(&str, &str)]) -> Attachments {
        list.iter()
            .map(|(p, c)| (p.to_string(), Bytes::from(c.to_string())))
            .collect()
    }

    fn errors(src: &str, f: &Attachments) -> Vec<String> {
        match parse_with_files("routes.toml", src, f) {
            Ok(_) => vec![],
            Err(d) => d.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn certificates_validate_and_round_trip() {
        let pki = Pki::new();
        let (api_c, api_k) = pki.leaf("api.example.com");
        let (www_c, www_k) = pki.leaf("www.example.com");
        let src = r#"
[certificates.api]
hosts = ["API.example.com", "*.api.example.com"]
cert_file = "api.pem"
key_file = "api.key"
client_ca_file = "ca.pem"
min_version = "1.3"

[certificates.www]
hosts = ["www.example.com"]
cert_file = "www.pem"
key_file = "www.key"
default = true

[upstreams.u]
endpoints = ["127.0.0.1:1"]
tls = { sni = "u.internal", ca_file = "ca.pem", cert_file = "www.pem", key_file = "www.key" }
"#;
        let f = files(&[
            ("api.pem", &api_c),
            ("api.key", &api_k),
            ("www.pem", &www_c),
            ("www.key", &www_k),
            ("ca.pem", &pki.ca_pem),
        ]);
        let c = parse_with_files("routes.toml", src, &f).unwrap_or_else(|e| panic!("{e}"));
        let api = &c.certificates["api"];
        assert_eq!(api.hosts[0].to_string(), "api.example.com");
        assert_eq!(api.min_version, crate::config::model::TlsVersion::V1_3);
        assert!(api.client_ca.is_some() && !api.default);
        assert!(c.certificates["www"].default);
        let keys = c.key_files();
        let secret: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(secret, ["api.key", "www.key"]);
        let mut refs = referenced_files("routes.toml", src).unwrap();
        refs.sort();
        assert_eq!(refs, ["api.key", "api.pem", "ca.pem", "www.key", "www.pem"]);

        // Debug never prints key material.
        let body = api_k.lines().nth(1).unwrap();
        assert!(!format!("{c:?}").contains(body));

        let compiled = crate::config::compile_with_files("routes.toml", src, &f).unwrap();
        let back = crate::config::wire::decode(&compiled.snapshot).unwrap();
        assert_eq!(back, compiled.config);
        // Rotating a certificate changes the content hash.
        let (api_c2, api_k2) = pki.leaf("api.example.com");
        let f2 = files(&[
            ("api.pem", &api_c2),
            ("api.key", &api_k2),
            ("www.pem", &www_c),
            ("www.key", &www_k),
            ("ca.pem", &pki.ca_pem),
        ]);
        let rotated = crate::config::compile_with_files("routes.toml", src, &f2).unwrap();
        assert_ne!(rotated.hash, compiled.hash);
    }

    #[test]
    fn certificate_problems_name_the_entry() {
        let pki = Pki::new();
        let (a_c, a_k) = pki.leaf("a.example.com");
        let (_, other_k) = pki.leaf("b.example.com");
        let src = r#"[certificates.api]
hosts = ["a.example.com"]
cert_file = "a.pem"
key_file = "other.key"
default = true

[certificates.b]
hosts = ["a.example.com", "*"]
cert_file = "missing.pem"
key_file = "a.key"
default = true

[certificates.c]
hosts = ["c.example.com"]
cert_file = "garbage.pem"
key_file = "a.key"
min_version = "1.1"
"#;
        let f = files(&[
            ("a.pem", &a_c),
            ("a.key", &a_k),
            ("other.key", &other_k),
            ("garbage.pem", "not a pem"),
        ]);
        let e = errors(src, &f);
        let find = |needle: &str| {
            e.iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {e:#?}"))
        };
        assert!(
            find("does not match the certificate")
                .starts_with("routes.toml:4:12: certificates.api.key_file:")
        );
        assert!(
            find("already served by certificates.api")
                .starts_with("routes.toml:8:10: certificates.b.hosts[0]")
        );
        assert!(find("not a certificate host").contains("certificates.b.hosts[1]"));
        assert!(find("was not uploaded").contains("certificates.b.cert_file"));
        assert!(find("already the default").contains("certificates.b.default"));
        assert!(find("no PEM CERTIFICATE").contains("certificates.c.cert_file"));
        assert!(find("unknown TLS version").contains("certificates.c.min_version"));
        // No message carries key material.
        let body = other_k.lines().nth(1).unwrap();
        assert!(!e.concat().contains(body));
    }

    #[test]
    fn upstream_tls_rules() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("client");
        let f = files(&[("ca.pem", &pki.ca_pem), ("c.pem", &c), ("c.key", &k)]);
        let up = |tls: &str| format!("[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\ntls = {tls}\n");
        assert_eq!(
            errors(&up("{ ca_file = \"ca.pem\" }"), &f),
            Vec::<String>::new()
        );
        assert_eq!(
            errors(&up("{ insecure_skip_verify = true }"), &f),
            Vec::<String>::new()
        );
        let e = errors(&up("{}"), &f);
        assert!(
            e[0].contains("upstreams.u.tls: upstream TLS needs ca_file"),
            "{e:?}"
        );
        let e = errors(&up("{ ca_file = \"ca.pem\", cert_file = \"c.pem\" }"), &f);
        assert!(e[0].contains("cert_file and key_file go together"), "{e:?}");
        let e = errors(&up("{ ca_file = \"c.key\" }"), &f);
        assert!(e[0].contains("upstreams.u.tls.ca_file"), "{e:?}");
        let e = errors(&up("{ ca_file = \"ca.pem\", sni = \"bad name!\" }"), &f);
        assert!(e[0].contains("upstreams.u.tls.sni"), "{e:?}");
        let e = errors(&up("{ ca_file = \"ca.pem\", bogus = 1 }"), &f);
        assert!(e[0].contains("bogus"), "{e:?}");
    }
}
