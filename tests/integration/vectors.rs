//! SigV4 header authentication against the AWS signing test suite
//! (`tests/vectors/aws-signing-test-suite/v4`, see `tests/vectors/SOURCE.md`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use warden::authn::sigv4::{self, Credential, SignedRequest, UriEncoding, Verifier};

/// A request parsed from a vector's `.txt` file.
struct VectorRequest {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl SignedRequest for VectorRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn raw_path(&self) -> &str {
        &self.path
    }
    fn raw_query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn header_values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn parse_request(text: &str) -> VectorRequest {
    let (head, body) = match text.find("\n\n") {
        Some(i) => (&text[..i], text.as_bytes()[i + 2..].to_vec()),
        None => (text, Vec::new()),
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap();
    let (method, rest) = request_line.split_once(' ').unwrap();
    // The two legacy cases omit the protocol from the request line.
    let target = rest.strip_suffix(" HTTP/1.1").unwrap_or(rest);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            // obs-fold continuation of the previous value
            let last = headers.last_mut().unwrap();
            last.1.push(b'\n');
            last.1.extend_from_slice(line.as_bytes());
            continue;
        }
        let (name, value) = line.split_once(':').unwrap();
        // As an HTTP parser would: optional whitespace around the value goes.
        headers.push((name.to_ascii_lowercase(), value.trim().as_bytes().to_vec()));
    }
    VectorRequest {
        method: method.to_owned(),
        path,
        query,
        headers,
        body,
    }
}

struct Vector {
    name: String,
    dir: PathBuf,
    context: serde_json::Value,
}

impl Vector {
    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap()
            .replace("\r\n", "\n")
    }
    fn normalize(&self) -> bool {
        self.context["normalize"].as_bool().unwrap_or(true)
    }
    fn time(&self) -> SystemTime {
        let ts = self.context["timestamp"].as_str().unwrap();
        let compact: String = ts.chars().filter(|c| *c != '-' && *c != ':').collect();
        sigv4::parse_amz_date(&compact).unwrap()
    }
}

fn vectors() -> Vec<Vector> {
    suite("v4")
}

fn suite(name: &str) -> Vec<Vector> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors/aws-signing-test-suite")
        .join(name);
    let mut out: Vec<Vector> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("header-signed-request.txt").exists())
        .map(|dir| {
            let context = std::fs::read_to_string(dir.join("context.json"))
                .map(|t| serde_json::from_str(&t).unwrap())
                .unwrap_or_else(|_| serde_json::json!({}));
            Vector {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                dir,
                context,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        out.len() >= 30,
        "expected the v4 suite, found {}",
        out.len()
    );
    out
}

fn payload_hash(req: &VectorRequest) -> String {
    match req.header_values("x-amz-content-sha256").next() {
        Some(v) => String::from_utf8(v.to_vec()).unwrap(),
        None => sigv4::sha256_hex(&req.body),
    }
}

/// `header` or `query`: the two forms every vector is signed in.
const FORMS: [&str; 2] = ["header", "query"];

/// The one case not verified: the query form of `post-sts-header-after`
/// (`omit_session_token`), whose `X-Amz-Security-Token` is appended to the
/// URL *after* signing. That is AWS IoT's websocket presigning; the SDKs that
/// talk to VPC Lattice (botocore, the Rust and Java SDKs) sign the token into
/// the query, and accepting both would need a second canonical form, which
/// warden refuses to guess.
fn skipped(v: &Vector, form: &str) -> bool {
    form == "query" && v.context["omit_session_token"].as_bool() == Some(true)
}

fn encoding(v: &Vector) -> UriEncoding {
    if v.normalize() {
        UriEncoding::Double
    } else {
        UriEncoding::Single
    }
}

fn auth_of(req: &VectorRequest, form: &str) -> sigv4::Auth {
    if form == "header" {
        let value =
            String::from_utf8(req.header_values("authorization").next().unwrap().to_vec()).unwrap();
        sigv4::parse_authorization(&value).unwrap()
    } else {
        sigv4::parse_presigned(req.query.as_deref().unwrap()).unwrap()
    }
}

fn verifier_for(v: &Vector) -> Verifier {
    let creds = &v.context["credentials"];
    let cred = Credential::new(
        creds["access_key_id"].as_str().unwrap(),
        creds["secret_access_key"].as_str().unwrap(),
        "arn:aws:iam::123456789012:user/vector",
    );
    Verifier::new(
        vec![v.context["region"].as_str().unwrap().to_owned()],
        v.context["service"].as_str().unwrap().to_owned(),
        Duration::from_secs(300),
        vec![cred],
    )
    .with_encoding(encoding(v))
}

/// Every vector's canonical request, in both forms, is rebuilt byte for byte
/// from the signed request and the client's SignedHeaders.
#[test]
fn canonical_requests_match_every_vector_in_both_forms() {
    let mut checked = 0;
    for v in vectors() {
        if !v.dir.join("context.json").exists() {
            continue; // the two migrated legacy cases carry no context; see below
        }
        for form in FORMS.into_iter().filter(|f| !skipped(&v, f)) {
            let req = parse_request(&v.read(&format!("{form}-signed-request.txt")));
            let auth = auth_of(&req, form);
            let canonical = sigv4::canonical_request(
                &req,
                &auth.signed_headers,
                &payload_hash(&req),
                encoding(&v),
                form == "query",
            )
            .unwrap();
            assert_eq!(
                String::from_utf8(canonical).unwrap(),
                v.read(&format!("{form}-canonical-request.txt")),
                "{form} canonical request of {}",
                v.name
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 75,
        "38 cases with a context in two forms, less the one skipped"
    );
}

/// The verifier accepts every vector's signed request in both forms, and
/// rejects it once any signed part changes or it falls outside its window.
#[test]
fn verifier_accepts_every_vector_in_both_forms_and_rejects_tampering() {
    let mut checked = 0;
    for v in vectors() {
        if !v.dir.join("context.json").exists() {
            continue;
        }
        let verifier = verifier_for(&v);
        for form in FORMS.into_iter().filter(|f| !skipped(&v, f)) {
            let text = v.read(&format!("{form}-signed-request.txt"));
            let req = parse_request(&text);
            let auth = auth_of(&req, form);
            let hash = payload_hash(&req);
            let what = format!("{form} {}", v.name);
            verifier
                .verify(&req, &auth, &hash, v.time())
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            // A tampered method, path or payload hash is refused.
            let mut bad = parse_request(&text);
            bad.method = if bad.method == "GET" {
                "POST".into()
            } else {
                "GET".into()
            };
            assert_eq!(
                verifier.verify(&bad, &auth, &hash, v.time()).unwrap_err(),
                sigv4::SigError::SignatureMismatch,
                "{what}"
            );
            let mut bad = parse_request(&text);
            bad.path.push('x');
            assert!(
                verifier.verify(&bad, &auth, &hash, v.time()).is_err(),
                "{what}"
            );
            let other = sigv4::sha256_hex(b"tampered");
            assert!(
                verifier.verify(&req, &auth, &other, v.time()).is_err(),
                "{what}"
            );
            // Outside the window: the skew (header) or X-Amz-Expires (query).
            let window = match &auth.presigned {
                Some((_, expires)) => *expires,
                None => Duration::from_secs(300),
            };
            let late = v.time() + window + Duration::from_secs(1);
            assert_eq!(
                verifier.verify(&req, &auth, &hash, late).unwrap_err(),
                sigv4::SigError::Expired,
                "{what}"
            );
            let early = v.time() - Duration::from_secs(301);
            assert_eq!(
                verifier.verify(&req, &auth, &hash, early).unwrap_err(),
                sigv4::SigError::NotYetValid,
                "{what}"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 75,
        "38 cases with a context in two forms, less the one skipped"
    );
}

/// A tampered query parameter of a presigned URL is refused, and so is a
/// second use when the replay guard is on.
#[test]
fn presigned_query_tampering_and_replay() {
    let v = vectors()
        .into_iter()
        .find(|v| v.name == "get-vanilla-query")
        .unwrap();
    let text = v.read("query-signed-request.txt");
    let req = parse_request(&text);
    let auth = auth_of(&req, "query");
    let hash = payload_hash(&req);
    let verifier = verifier_for(&v).with_replay_guard(16);
    verifier.verify(&req, &auth, &hash, v.time()).unwrap();
    assert_eq!(
        verifier.verify(&req, &auth, &hash, v.time()).unwrap_err(),
        sigv4::SigError::Replayed
    );
    let mut bad = parse_request(&text);
    bad.query = bad
        .query
        .map(|q| q.replace("X-Amz-Expires=3600", "X-Amz-Expires=3601"));
    let bad_auth = auth_of(&bad, "query");
    assert_eq!(
        verifier_for(&v)
            .verify(&bad, &bad_auth, &hash, v.time())
            .unwrap_err(),
        sigv4::SigError::SignatureMismatch
    );
}

/// The two legacy double-encoding cases (header form only, no context.json):
/// the canonical URI encodes the received path once more, and the signed
/// request verifies with the key it was signed with (the suite's example key,
/// or `aws-credential-types`' test key `ANOTREAL`) and its own scope.
#[test]
fn legacy_double_encoding_cases() {
    for name in ["double-encode-path", "double-url-encode"] {
        let v = vectors().into_iter().find(|v| v.name == name).unwrap();
        let expected = v.read("header-canonical-request.txt");
        let signed = parse_request(&v.read("header-signed-request.txt"));
        let uri_line = expected.lines().nth(1).unwrap();
        assert_eq!(
            sigv4::canonical_uri(&signed.path, UriEncoding::Double),
            uri_line,
            "{name}"
        );
        // (double-encode-path's canonical file carries another date than its
        // signed request, so the full text is compared through the signature.)
        let auth = auth_of(&signed, "header");
        let verifier = Verifier::new(
            vec![auth.region.clone()],
            auth.service.clone(),
            Duration::from_secs(300),
            vec![
                Credential::new(
                    "AKIDEXAMPLE",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                    "arn:aws:iam::123456789012:user/vector",
                ),
                Credential::new(
                    "ANOTREAL",
                    "notrealrnrELgWzOk3IfjzDKtFBhDby",
                    "arn:aws:iam::123456789012:user/vector",
                ),
            ],
        );
        let date =
            String::from_utf8(signed.header_values("x-amz-date").next().unwrap().to_vec()).unwrap();
        let at = sigv4::parse_amz_date(&date).unwrap();
        verifier
            .verify(&signed, &auth, &payload_hash(&signed), at)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Wrong scope and unknown keys are refused with their own reasons.
#[test]
fn scope_and_key_errors() {
    let v = vectors()
        .into_iter()
        .find(|v| v.name == "get-vanilla")
        .unwrap();
    let req = parse_request(&v.read("header-signed-request.txt"));
    let auth_value =
        String::from_utf8(req.header_values("authorization").next().unwrap().to_vec()).unwrap();
    let auth = sigv4::parse_authorization(&auth_value).unwrap();
    let hash = payload_hash(&req);
    let cred =
        |id: &str, secret: &str| Credential::new(id, secret, "arn:aws:iam::123456789012:user/v");
    let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let skew = Duration::from_secs(300);
    let wrong_region = Verifier::new(
        vec!["eu-west-1".into()],
        "service".into(),
        skew,
        vec![cred("AKIDEXAMPLE", secret)],
    );
    assert_eq!(
        wrong_region
            .verify(&req, &auth, &hash, v.time())
            .unwrap_err(),
        sigv4::SigError::WrongScope("region")
    );
    let wrong_service = Verifier::new(
        vec!["us-east-1".into()],
        "vpc-lattice-svcs".into(),
        skew,
        vec![cred("AKIDEXAMPLE", secret)],
    );
    assert_eq!(
        wrong_service
            .verify(&req, &auth, &hash, v.time())
            .unwrap_err(),
        sigv4::SigError::WrongScope("service")
    );
    let unknown = Verifier::new(
        vec!["us-east-1".into()],
        "service".into(),
        skew,
        vec![cred("AKIDOTHER", secret)],
    );
    assert_eq!(
        unknown.verify(&req, &auth, &hash, v.time()).unwrap_err(),
        sigv4::SigError::UnknownAccessKey
    );
    let wrong_secret = Verifier::new(
        vec!["us-east-1".into()],
        "service".into(),
        skew,
        vec![cred("AKIDEXAMPLE", "not-the-secret")],
    );
    assert_eq!(
        wrong_secret
            .verify(&req, &auth, &hash, v.time())
            .unwrap_err(),
        sigv4::SigError::SignatureMismatch
    );
}

/// SigV4A (`AWS4-ECDSA-P256-SHA256`): the key derived from each vector's
/// credentials is the suite's public key, the canonical requests match, and
/// the signed requests verify in both forms (and fail once tampered).
#[test]
fn sigv4a_vectors_verify_in_both_forms() {
    let mut checked = 0;
    for v in suite("v4a") {
        let creds = &v.context["credentials"];
        let (akid, secret) = (
            creds["access_key_id"].as_str().unwrap(),
            creds["secret_access_key"].as_str().unwrap(),
        );
        let public: serde_json::Value = serde_json::from_str(&v.read("public-key.json")).unwrap();
        let expected = format!(
            "04{}{}",
            public["X"].as_str().unwrap(),
            public["Y"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(sigv4::sigv4a_public_key(akid, secret).unwrap()),
            expected.to_lowercase(),
            "{}",
            v.name
        );
        let verifier = verifier_for(&v);
        for form in FORMS.into_iter().filter(|f| !skipped(&v, f)) {
            let text = v.read(&format!("{form}-signed-request.txt"));
            let req = parse_request(&text);
            let auth = auth_of(&req, form);
            assert_eq!(auth.algorithm, sigv4::SigAlg::V4a);
            let hash = payload_hash(&req);
            let what = format!("v4a {form} {}", v.name);
            let canonical = sigv4::canonical_request(
                &req,
                &auth.signed_headers,
                &hash,
                encoding(&v),
                form == "query",
            )
            .unwrap();
            assert_eq!(
                String::from_utf8(canonical).unwrap(),
                v.read(&format!("{form}-canonical-request.txt")),
                "{what}"
            );
            verifier
                .verify(&req, &auth, &hash, v.time())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut bad = parse_request(&text);
            bad.path.push('x');
            assert_eq!(
                verifier.verify(&bad, &auth, &hash, v.time()).unwrap_err(),
                sigv4::SigError::SignatureMismatch,
                "{what}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 75, "38 cases in two forms, less the one skipped");
}

#[test]
fn sigv4a_region_set_must_cover_a_configured_region() {
    assert!(sigv4::region_set_covers("us-east-1", "us-east-1"));
    assert!(sigv4::region_set_covers("eu-west-1,us-*", "us-east-1"));
    assert!(sigv4::region_set_covers("*", "ap-south-1"));
    assert!(!sigv4::region_set_covers("us-west-2", "us-east-1"));
    assert!(!sigv4::region_set_covers("eu-*", "us-east-1"));
    let v = suite("v4a")
        .into_iter()
        .find(|v| v.name == "get-vanilla")
        .unwrap();
    let req = parse_request(&v.read("header-signed-request.txt"));
    let auth = auth_of(&req, "header");
    let creds = &v.context["credentials"];
    let elsewhere = Verifier::new(
        vec!["eu-west-1".into()],
        "service".into(),
        Duration::from_secs(300),
        vec![Credential::new(
            creds["access_key_id"].as_str().unwrap(),
            creds["secret_access_key"].as_str().unwrap(),
            "arn:aws:iam::123456789012:user/v",
        )],
    );
    assert_eq!(
        elsewhere
            .verify(&req, &auth, &payload_hash(&req), v.time())
            .unwrap_err(),
        sigv4::SigError::WrongScope("region set")
    );
}
