//! SigV4 header authentication against the AWS signing test suite
//! (`tests/vectors/aws-signing-test-suite/v4`, see `tests/vectors/SOURCE.md`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use warden::authn::sigv4::{self, Credential, SignedRequest, Verifier};

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
    fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
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
    let target = rest.strip_suffix(" HTTP/1.1").unwrap();
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
        headers.push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
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
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/aws-signing-test-suite/v4");
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
    match req.header_values("x-amz-content-sha256").first() {
        Some(v) => String::from_utf8(v.to_vec()).unwrap(),
        None => sigv4::sha256_hex(&req.body),
    }
}

/// Every vector's canonical request is rebuilt byte for byte from the signed
/// request and the client's SignedHeaders.
#[test]
fn canonical_requests_match_every_vector() {
    let mut checked = 0;
    for v in vectors() {
        if !v.dir.join("context.json").exists() {
            continue; // the two migrated legacy cases carry no context; see below
        }
        let req = parse_request(&v.read("header-signed-request.txt"));
        let auth = req.header_values("authorization")[0];
        let auth = sigv4::parse_authorization(std::str::from_utf8(auth).unwrap()).unwrap();
        let canonical = sigv4::canonical_request(
            &req,
            auth.signed_headers,
            &payload_hash(&req),
            v.normalize(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(canonical).unwrap(),
            v.read("header-canonical-request.txt"),
            "canonical request of {}",
            v.name
        );
        checked += 1;
    }
    assert!(checked >= 30, "{checked}");
}

/// The verifier accepts every normalized (non-S3) vector's signed request,
/// and rejects it once any signed part changes.
#[test]
fn verifier_accepts_every_normalized_vector_and_rejects_tampering() {
    let mut checked = 0;
    for v in vectors() {
        if !v.dir.join("context.json").exists() || !v.normalize() {
            continue;
        }
        let creds = &v.context["credentials"];
        let cred = Credential::new(
            creds["access_key_id"].as_str().unwrap(),
            creds["secret_access_key"].as_str().unwrap(),
            "arn:aws:iam::123456789012:user/vector",
        );
        let verifier = Verifier::new(
            vec![v.context["region"].as_str().unwrap().to_owned()],
            v.context["service"].as_str().unwrap().to_owned(),
            Duration::from_secs(300),
            vec![cred],
        );
        let text = v.read("header-signed-request.txt");
        let req = parse_request(&text);
        let auth_value = String::from_utf8(req.header_values("authorization")[0].to_vec()).unwrap();
        let auth = sigv4::parse_authorization(&auth_value).unwrap();
        let hash = payload_hash(&req);
        verifier
            .verify(&req, &auth, &hash, v.time())
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));

        // A tampered method, path, date or payload hash is refused.
        let mut bad = parse_request(&text);
        bad.method = if bad.method == "GET" {
            "POST".into()
        } else {
            "GET".into()
        };
        assert_eq!(
            verifier.verify(&bad, &auth, &hash, v.time()).unwrap_err(),
            sigv4::SigError::SignatureMismatch,
            "{}",
            v.name
        );
        let mut bad = parse_request(&text);
        bad.path.push('x');
        assert!(
            verifier.verify(&bad, &auth, &hash, v.time()).is_err(),
            "{}",
            v.name
        );
        let other = sigv4::sha256_hex(b"tampered");
        assert!(
            verifier.verify(&req, &auth, &other, v.time()).is_err(),
            "{}",
            v.name
        );
        // Outside the skew window.
        let late = v.time() + Duration::from_secs(301);
        assert_eq!(
            verifier.verify(&req, &auth, &hash, late).unwrap_err(),
            sigv4::SigError::Expired
        );
        let early = v.time() - Duration::from_secs(301);
        assert_eq!(
            verifier.verify(&req, &auth, &hash, early).unwrap_err(),
            sigv4::SigError::NotYetValid
        );
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

/// The two legacy double-encoding cases (no context.json): the canonical URI
/// encodes the received path once more.
#[test]
fn legacy_double_encoding_cases() {
    for name in ["double-encode-path", "double-url-encode"] {
        let v = vectors().into_iter().find(|v| v.name == name).unwrap();
        let req = parse_request(&v.read("request.txt"));
        let expected = v.read("header-canonical-request.txt");
        let uri_line = expected.lines().nth(1).unwrap();
        assert_eq!(sigv4::canonical_uri(&req.path, true), uri_line, "{name}");
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
    let auth_value = String::from_utf8(req.header_values("authorization")[0].to_vec()).unwrap();
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
