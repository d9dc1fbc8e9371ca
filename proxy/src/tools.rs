//! Offline decisions: `warden authorize` and `warden policy test`.
//!
//! Both build the same Cedar request the proxy would — principal with its
//! parent chain, action, segment-aware resource, context — from a principal
//! written as a Cedar entity (`Aws::Role::"arn:…"`), a method and a path.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::authn::mtls::SpiffeId;
use crate::authn::{AwsFacts, AwsPrincipal, Identity, Principal};
use crate::authz::{AuthzInput, PolicySnapshot};
use crate::config::{Config, PrincipalKind};
use crate::error::ProxyError;
use crate::normalize::normalize_path;
use crate::trace::{ConnInfo, Decision};

/// What an offline request says beyond principal, method and path.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extra {
    /// Socket peer (`context.source_ip`); default 127.0.0.1.
    pub source_ip: Option<IpAddr>,
    /// `context.host`.
    pub host: Option<String>,
    /// Listener port (`context.port`); default the configured listener's.
    pub port: Option<u16>,
    /// `context.aws.session_name` for an `Aws::Role`.
    pub session_name: Option<String>,
    /// `context.aws.presigned`.
    #[serde(default)]
    pub presigned: bool,
}

/// Builds the identity the proxy would have for `principal`
/// (`Type::"id"`), using the config for org ids and clusters.
pub fn identity_of(principal: &str, cfg: &Config, extra: &Extra) -> Result<Identity, String> {
    let uid = cedar_policy::EntityUid::from_str(principal)
        .map_err(|e| format!("principal `{principal}`: {e}"))?;
    let ty = uid.type_name().to_string();
    let id = uid.id().unescaped().to_owned();
    let issuer_of = |kind: PrincipalKind| cfg.authn.jwt.iter().find(|j| j.principal == kind);
    let (principal, method, aws) = match ty.as_str() {
        "Aws::Role" | "Aws::User" => {
            let mut p = AwsPrincipal::from_arn(&id)?;
            if (ty == "Aws::Role") != (p.kind == crate::authn::AwsKind::Role) {
                return Err(format!(
                    "principal `{principal}`: the ARN does not name a {ty}"
                ));
            }
            p.session_name = extra.session_name.clone().or(p.session_name);
            let aws = AwsFacts {
                access_key_id: "offline".to_owned(),
                org_id: cfg.authn.aws.accounts.get(&p.account).cloned(),
                tags: Default::default(),
                presigned: extra.presigned,
            };
            (Principal::Aws(p), "sigv4", Some(aws))
        }
        "Spiffe::Id" => (Principal::Spiffe(SpiffeId::parse(&id)?), "mtls", None),
        "K8s::ServiceAccount" => {
            let (namespace, name) = id
                .split_once('/')
                .ok_or_else(|| format!("principal `{principal}`: expected \"namespace/name\""))?;
            let cluster = issuer_of(PrincipalKind::K8s)
                .map(|j| j.cluster.clone().unwrap_or_else(|| j.issuer.clone()))
                .unwrap_or_default();
            let p = Principal::K8s {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                cluster,
            };
            (p, "jwt", None)
        }
        "Oidc::Subject" => {
            let iss = issuer_of(PrincipalKind::Oidc)
                .map(|j| j.issuer.clone())
                .unwrap_or_default();
            (Principal::Oidc { sub: id, iss }, "jwt", None)
        }
        "Warden::Anonymous" => (Principal::Anonymous, "none", None),
        other => {
            return Err(format!(
                "principal `{principal}`: unknown principal type `{other}`"
            ))
        }
    };
    Ok(Identity {
        principal,
        method,
        aws,
        jwt: None,
    })
}

/// Parses `name:value` header arguments.
pub fn headers_of(args: &[String]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for arg in args {
        let (k, v) = arg
            .split_once(':')
            .ok_or_else(|| format!("header `{arg}`: expected `name:value`"))?;
        let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("header `{arg}`: invalid name"))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| format!("header `{arg}`: invalid value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Decides one offline request. `Err` for a request the proxy would answer
/// before authorization (400, 405) or that cannot be built.
pub fn decide(
    policies: &PolicySnapshot,
    cfg: &Config,
    principal: &str,
    method: &str,
    target: &str,
    headers: &HeaderMap,
    extra: &Extra,
) -> Result<Decision, String> {
    let identity = identity_of(principal, cfg, extra)?;
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let path = normalize_path(raw_path).map_err(|e| format!("path `{raw_path}`: 400 {e}"))?;
    let conn = ConnInfo::new(
        SocketAddr::new(extra.source_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])), 0),
        SocketAddr::new(
            cfg.listener.address.ip(),
            extra.port.unwrap_or(cfg.listener.address.port()),
        ),
        None,
    );
    let input = AuthzInput {
        identity: &identity,
        method,
        path: &path,
        query,
        headers,
        host: extra
            .host
            .as_deref()
            .or_else(|| headers.get("host").and_then(|h| h.to_str().ok())),
        conn: &conn,
        service: None,
        service_arn: None,
    };
    policies.decide(&input).map_err(|e| match e {
        ProxyError::MethodNotAllowed => {
            format!("method `{method}`: 405, not an action in the schema")
        }
        other => other.to_string(),
    })
}

/// Loads the policy set the config names.
pub fn load_policies(cfg: &Config) -> Result<PolicySnapshot, String> {
    PolicySnapshot::load(
        &cfg.authz.policies,
        &cfg.authz.schema_path(),
        cfg.authz.mode,
        &cfg.service,
    )
}

/// One case of a `warden policy test` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub principal: String,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub context: Extra,
    /// `"ALLOW"` or `"DENY"`.
    pub expect: String,
    /// When given, the determining policies must be exactly these.
    pub policies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cases {
    pub cases: Vec<Case>,
}

/// Runs a case file; returns one line per case and whether all passed.
pub fn run_cases(cases_file: &Path, cfg: &Config) -> Result<(Vec<String>, bool), String> {
    let text = std::fs::read_to_string(cases_file)
        .map_err(|e| format!("{}: {e}", cases_file.display()))?;
    let cases: Cases =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cases_file.display()))?;
    let policies = Arc::new(load_policies(cfg)?);
    let mut lines = Vec::new();
    let mut all = true;
    for case in &cases.cases {
        let want_allow = match case.expect.as_str() {
            "ALLOW" => true,
            "DENY" => false,
            other => {
                return Err(format!(
                    "{}: case `{}`: expect must be ALLOW or DENY, not `{other}`",
                    cases_file.display(),
                    case.name
                ))
            }
        };
        let args: Vec<String> = case
            .headers
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let headers = headers_of(&args)?;
        let outcome = decide(
            &policies,
            cfg,
            &case.principal,
            &case.method,
            &case.path,
            &headers,
            &case.context,
        );
        let (ok, got) = match &outcome {
            Ok(d) => {
                let ids_ok = case.policies.as_ref().is_none_or(|want| {
                    let mut got = d.policies.to_vec();
                    let mut want = want.clone();
                    got.sort();
                    want.sort();
                    got == want
                });
                (
                    d.allow == want_allow && ids_ok,
                    format!(
                        "{} [{}]",
                        if d.allow { "ALLOW" } else { "DENY" },
                        d.policies.join(", ")
                    ),
                )
            }
            Err(e) => (false, format!("error: {e}")),
        };
        all &= ok;
        lines.push(format!(
            "{} {}: expected {}, got {got}",
            if ok { "ok  " } else { "FAIL" },
            case.name,
            case.expect
        ));
    }
    Ok((lines, all))
}

/// Curl options that take a value (so the value is not the URL).
const CURL_VALUED: [&str; 34] = [
    "-X",
    "--request",
    "-H",
    "--header",
    "-d",
    "--data",
    "--data-raw",
    "--data-binary",
    "--data-ascii",
    "-o",
    "--output",
    "-w",
    "--write-out",
    "--cacert",
    "--capath",
    "--cert",
    "--key",
    "-E",
    "-u",
    "--user",
    "-A",
    "--user-agent",
    "-e",
    "--referer",
    "--connect-timeout",
    "-m",
    "--max-time",
    "--resolve",
    "--connect-to",
    "-x",
    "--proxy",
    "-b",
    "--cookie",
    "--url",
];

/// Rewrites a curl command line so the request it makes is SigV4-signed:
/// reads its method, URL, headers and body, signs them with AWS's signer and
/// returns the command with the signing headers added.
pub fn sign_curl(
    argv: &[String],
    key: &crate::devkit::SigV4Key<'_>,
    now: std::time::SystemTime,
) -> Result<Vec<String>, String> {
    let (program, args) = argv.split_first().ok_or("nothing to run after `--`")?;
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if name != "curl" {
        return Err(format!(
            "`{program}`: only curl command lines can be signed"
        ));
    }
    let mut method: Option<String> = None;
    let mut url: Option<String> = None;
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (opt, inline) = match a.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v.to_owned())),
            _ => (a, None),
        };
        if matches!(
            opt,
            "-F" | "--form" | "-T" | "--upload-file" | "--json" | "-G" | "--get"
        ) {
            return Err(format!(
                "`{opt}`: warden sign cannot sign this form of request"
            ));
        }
        if CURL_VALUED.contains(&opt) {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("`{opt}` needs a value"))?
                }
            };
            match opt {
                "-X" | "--request" => method = Some(value),
                "-H" | "--header" => {
                    let (k, v) = value
                        .split_once(':')
                        .ok_or_else(|| format!("header `{value}`: expected `name: value`"))?;
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
                "-d" | "--data" | "--data-ascii" | "--data-raw" | "--data-binary" => {
                    let bytes = match value.strip_prefix('@') {
                        Some(file) if opt != "--data-raw" => {
                            let mut b = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
                            if opt != "--data-binary" {
                                b.retain(|c| *c != b'\n' && *c != b'\r');
                            }
                            b
                        }
                        _ => value.into_bytes(),
                    };
                    data.push(bytes);
                }
                "--url" => url = Some(value),
                _ => {}
            }
        } else if !a.starts_with('-') && url.is_none() {
            url = Some(a.to_owned());
        }
        i += 1;
    }
    let url = url.ok_or("the curl command has no URL")?;
    let body = data.join(&b'&');
    let method = method.unwrap_or_else(|| {
        if data.is_empty() {
            "GET".to_owned()
        } else {
            "POST".to_owned()
        }
    });
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = headers
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.clone())
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .ok_or_else(|| format!("`{url}` has no host"))?;
    let mut signed: Vec<(&str, &str)> = vec![("host", host.as_str())];
    signed.extend(
        headers
            .iter()
            .filter(|(k, _)| k != "host")
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let added = crate::devkit::sign_sigv4(key, &method, &url, &signed, &body, now, true)
        .map_err(|e| e.to_string())?;
    let mut out = argv.to_vec();
    for (k, v) in added {
        out.push("-H".to_owned());
        out.push(format!("{k}: {v}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> crate::devkit::SigV4Key<'static> {
        crate::devkit::SigV4Key {
            access_key_id: "AKID",
            secret: "secret",
            session_token: Some("token"),
            region: "us-east-1",
            service: "vpc-lattice-svcs",
        }
    }

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn signs_a_curl_command_line() {
        let out = sign_curl(
            &args(&[
                "curl",
                "-sS",
                "--cacert",
                "ca.pem",
                "-H",
                "x-env: prod",
                "-d",
                "{}",
                "https://svc.local:15000/api/x?a=1",
            ]),
            &key(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(
            &out[..9],
            &args(&[
                "curl",
                "-sS",
                "--cacert",
                "ca.pem",
                "-H",
                "x-env: prod",
                "-d",
                "{}",
                "https://svc.local:15000/api/x?a=1"
            ])[..]
        );
        let added = out[9..].join(" ");
        assert!(
            added.contains("authorization: AWS4-HMAC-SHA256 Credential=AKID/"),
            "{added}"
        );
        assert!(
            added.contains(
                "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token;x-env"
            ),
            "{added}"
        );
        assert!(added.contains("x-amz-security-token: token"), "{added}");
    }

    #[test]
    fn refuses_what_it_cannot_sign() {
        let now = std::time::SystemTime::now();
        assert!(sign_curl(&args(&["wget", "https://x"]), &key(), now)
            .unwrap_err()
            .contains("only curl"));
        assert!(
            sign_curl(&args(&["curl", "-F", "a=b", "https://x"]), &key(), now)
                .unwrap_err()
                .contains("-F")
        );
        assert!(sign_curl(&args(&["curl", "-sS"]), &key(), now)
            .unwrap_err()
            .contains("no URL"));
    }
}
