//! The CA's rules, exercised on a real state directory: init, tokens, enrollment and every
//! refusal, with time moved explicitly.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ::time::OffsetDateTime;
use rcgen::PublicKeyData;
use revproxy_ca::{
    Ca, CaError, EnrollError, EnrollRequest, InitOptions, NewToken, Pin, Token, TokenState,
    MIN_RENEWAL_AGE_PERCENT,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn new_ca(dir: &Path) -> Ca {
    Ca::init(dir, &InitOptions::default(), now()).unwrap()
}

fn token(ca: &Ca, hosts: &[&str]) -> Token {
    ca.create_token(
        &NewToken {
            agent: "web-1".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            private_hosts: Vec::new(),
            connect: Vec::new(),
            ttl: Duration::from_secs(3600),
            cert_ttl: Duration::from_secs(24 * 3600),
            server: None,
        },
        now(),
    )
    .unwrap()
}

/// A CSR for a fresh key that asks for `names` (which the CA must ignore).
fn csr(names: &[&str]) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn enroll(
    ca: &Ca,
    token: &Token,
    csr_pem: &str,
    at: OffsetDateTime,
) -> Result<revproxy_ca::Enrolled, EnrollError> {
    ca.enroll(
        &EnrollRequest {
            token_id: &token.public.id,
            secret: &token.secret,
            csr_pem,
        },
        at,
    )
}

/// What the store holds, as one comparable value: its version (which every write moves)
/// and every record.
fn state_bytes(dir: &Path) -> Vec<u8> {
    use revproxy_ca::Store;
    let store = revproxy_ca::sqlite::SqliteStore::new(dir);
    let mut seen = store.version().unwrap().to_be_bytes().to_vec();
    seen.extend(serde_json::to_vec(&store.read().unwrap()).unwrap());
    seen
}

/// Every byte the store keeps on disk, its write-ahead log included.
fn raw_store(dir: &Path) -> Vec<u8> {
    let mut raw = std::fs::read(dir.join("state.db")).unwrap();
    raw.extend(std::fs::read(dir.join("state.db-wal")).unwrap_or_default());
    raw
}

#[test]
fn init_creates_private_files_and_refuses_to_run_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let ca = new_ca(&dir);
    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("server.key"), 0o600);
    assert_eq!(mode("state.db"), 0o600);
    if dir.join("state.db-wal").exists() {
        assert_eq!(mode("state.db-wal"), 0o600);
    }
    assert!(ca.pin().to_string().starts_with("sha256:"));

    let key_before = std::fs::read(dir.join("ca.key")).unwrap();
    let err = Ca::init(&dir, &InitOptions::default(), now()).unwrap_err();
    assert!(matches!(err, CaError::AlreadyInitialized(_)), "{err}");
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), key_before);

    let reopened = Ca::open(&dir).unwrap();
    assert_eq!(reopened.pin(), ca.pin());
}

#[test]
fn pin_is_the_sha256_of_the_ca_public_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
    assert_eq!(Pin::from_spki(cert.public_key().raw), ca.pin());
    assert!(cert.is_ca());
}

#[test]
fn open_refuses_a_key_others_can_read() {
    let tmp = tempfile::tempdir().unwrap();
    new_ca(tmp.path());
    let key = tmp.path().join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::open(tmp.path()).unwrap_err();
    assert!(
        matches!(err, CaError::InsecurePermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"));
}

#[test]
fn open_without_ca_says_how_to_make_one() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Ca::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("revproxy ca init"), "{err}");
}

#[test]
fn token_names_server_pin_and_lists_without_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["App.Example.com", "*.example.org"]);
    assert_eq!(t.public.server, "localhost:7443");
    assert_eq!(t.pins(), vec![ca.pin()]);
    let parsed = Token::parse(&t.encode()).unwrap();
    assert_eq!(parsed, t);

    let list = ca.list_tokens(now()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].hosts, ["app.example.com", "*.example.org"]);
    assert_eq!(list[0].state, TokenState::Open);
    let on_disk = String::from_utf8_lossy(&raw_store(tmp.path())).into_owned();
    assert!(
        !on_disk.contains(&t.secret.to_base64()),
        "the secret is never stored"
    );

    let later = now() + ::time::Duration::hours(2);
    assert_eq!(ca.list_tokens(later).unwrap()[0].state, TokenState::Expired);
    ca.revoke_token(&t.public.id).unwrap();
    assert_eq!(ca.list_tokens(now()).unwrap()[0].state, TokenState::Revoked);
    assert!(matches!(
        ca.revoke_token("nope"),
        Err(CaError::UnknownToken(_))
    ));
}

#[test]
fn bad_token_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let mk = |agent: &str, hosts: Vec<String>, ttl: u64, cert_ttl: u64| NewToken {
        agent: agent.into(),
        hosts,
        private_hosts: Vec::new(),
        connect: Vec::new(),
        ttl: Duration::from_secs(ttl),
        cert_ttl: Duration::from_secs(cert_ttl),
        server: None,
    };
    let ok_hosts = vec!["a.example.com".to_string()];
    for req in [
        mk("bad name", ok_hosts.clone(), 3600, 86400),
        mk("a", vec![], 3600, 86400),
        mk("a", vec!["bad_host".into()], 3600, 86400),
        mk("a", ok_hosts.clone(), 0, 86400),
        mk("a", ok_hosts.clone(), 3600, 0),
        mk("a", ok_hosts.clone(), 3600, 30 * 86400),
    ] {
        let err = ca.create_token(&req, now()).unwrap_err();
        assert!(matches!(err, CaError::InvalidInput(_)), "{req:?}: {err}");
    }
    let mut bad_server = mk("a", ok_hosts, 3600, 86400);
    bad_server.server = Some("no-port".into());
    assert!(ca.create_token(&bad_server, now()).is_err());
    assert!(
        ca.list_tokens(now()).unwrap().is_empty(),
        "nothing was stored"
    );
}

#[test]
fn enrollment_issues_the_documented_profile_and_ignores_csr_names() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["app.example.com", "*.apps.example.com"]);
    let (key, csr_pem) = csr(&["evil.example.com", "bank.example"]);
    let at = now();
    let out = enroll(&ca, &t, &csr_pem, at).unwrap();
    assert_eq!(out.agent, "web-1");
    assert_eq!(out.identity, "spiffe://revproxy.local/agent/web-1");
    assert!(!out.reissued);

    let der = revproxy_ca::pem_to_der(&out.cert_pem, "CERTIFICATE").unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cn, ["web-1"]);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let mut uris = vec![];
    let mut dns = vec![];
    for name in &san.general_names {
        match name {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(uris, ["spiffe://revproxy.local/agent/web-1"]);
    assert_eq!(dns, ["app.example.com", "*.apps.example.com"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
    assert!(!cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    assert!(cert.raw_serial().len() >= 16, "serial of at least 128 bits");
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let v = cert.validity();
    assert_eq!(
        v.not_before.timestamp(),
        at.unix_timestamp() - 60,
        "backdated a minute"
    );
    assert_eq!(v.not_after.timestamp(), at.unix_timestamp() + 24 * 3600);
    // Chained to the CA: the CA's key signed it.
    let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert_eq!(out.ca_pem, ca.cert_pem());
    assert_eq!(ca.list_tokens(now()).unwrap()[0].state, TokenState::Used);
}

#[test]
fn used_token_never_works_again_but_a_quick_retry_with_the_same_key_gets_the_same_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["app.example.com"]);
    let (_, csr_pem) = csr(&[]);
    let at = now();
    let first = enroll(&ca, &t, &csr_pem, at).unwrap();

    // The answer was lost; the agent retries with the same key: same certificate.
    let again = enroll(&ca, &t, &csr_pem, at + ::time::Duration::minutes(1)).unwrap();
    assert!(again.reissued);
    assert_eq!(again.cert_pem, first.cert_pem);

    // Another key, or too late, or after a restart with another key: used.
    let (_, other_csr) = csr(&[]);
    assert!(matches!(
        enroll(&ca, &t, &other_csr, at),
        Err(EnrollError::Used)
    ));
    let late = at + ::time::Duration::minutes(6);
    assert!(matches!(
        enroll(&ca, &t, &csr_pem, late),
        Err(EnrollError::Used)
    ));
    let restarted = Ca::open(tmp.path()).unwrap();
    assert!(matches!(
        enroll(&restarted, &t, &other_csr, at),
        Err(EnrollError::Used)
    ));
}

#[test]
fn refusals_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let (_, csr_pem) = csr(&[]);

    let expired = token(&ca, &["a.example.com"]);
    let revoked = token(&ca, &["b.example.com"]);
    ca.revoke_token(&revoked.public.id).unwrap();
    let good = token(&ca, &["c.example.com"]);
    let before = state_bytes(tmp.path());

    let later = now() + ::time::Duration::hours(2);
    assert!(matches!(
        enroll(&ca, &expired, &csr_pem, later),
        Err(EnrollError::Expired)
    ));
    assert!(matches!(
        enroll(&ca, &revoked, &csr_pem, now()),
        Err(EnrollError::Revoked)
    ));

    let mut wrong_secret = good.clone();
    wrong_secret.secret = revproxy_ca::Secret::generate();
    assert!(matches!(
        enroll(&ca, &wrong_secret, &csr_pem, now()),
        Err(EnrollError::WrongSecret)
    ));
    // A wrong secret learns nothing about the token's state.
    let mut probe = revoked.clone();
    probe.secret = revproxy_ca::Secret::generate();
    assert!(matches!(
        enroll(&ca, &probe, &csr_pem, now()),
        Err(EnrollError::WrongSecret)
    ));

    let mut unknown = good.clone();
    unknown.public.id = "0000000000000000".into();
    assert!(matches!(
        enroll(&ca, &unknown, &csr_pem, now()),
        Err(EnrollError::UnknownToken)
    ));

    // A CSR whose signature does not verify: flip a bit of the signature.
    let mut der = revproxy_ca::pem_to_der(&csr_pem, "CERTIFICATE REQUEST").unwrap();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    let err = enroll(&ca, &good, &tampered, now()).unwrap_err();
    assert!(matches!(err, EnrollError::BadCsr(_)), "{err}");
    assert!(matches!(
        enroll(&ca, &good, "not a csr", now()),
        Err(EnrollError::BadCsr(_))
    ));
    let huge = "A".repeat(20_000);
    assert!(matches!(
        enroll(&ca, &good, &huge, now()),
        Err(EnrollError::BadCsr(_))
    ));

    assert_eq!(
        state_bytes(tmp.path()),
        before,
        "no refusal changed the state"
    );
    // And the good token still works afterwards.
    enroll(&ca, &good, &csr_pem, now()).unwrap();
}

#[test]
fn twenty_concurrent_enrollments_with_one_token_issue_exactly_one_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Arc::new(new_ca(tmp.path()));
    let t = token(&ca, &["app.example.com"]);
    let barrier = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (ca, t, barrier) = (ca.clone(), t.clone(), barrier.clone());
            let dir = tmp.path().to_path_buf();
            std::thread::spawn(move || {
                let (_, csr_pem) = csr(&[]);
                let own = Ca::open(&dir).unwrap();
                barrier.wait();
                // Half share one handle, half hold their own, as separate processes would.
                let ca = if i % 2 == 0 { &own } else { &*ca };
                enroll(ca, &t, &csr_pem, now())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let used = results
        .iter()
        .filter(|r| matches!(r, Err(EnrollError::Used)))
        .count();
    assert_eq!((ok, used), (1, 19), "{results:?}");
}

#[test]
fn grants_can_be_narrowed_for_known_agents_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["a.example.com", "b.example.com"]);
    enroll(&ca, &t, &csr(&[]).1, now()).unwrap();
    assert_eq!(
        ca.set_hosts("web-1", &["A.example.com".into()]).unwrap(),
        ["a.example.com"]
    );
    let state = ca.state().read().unwrap();
    assert_eq!(state.agents["web-1"].hosts, ["a.example.com"]);
    assert!(matches!(
        ca.set_hosts("ghost", &[]),
        Err(CaError::UnknownCert(_))
    ));
    assert!(matches!(
        ca.set_hosts("web-1", &["bad host".into()]),
        Err(CaError::InvalidInput(_))
    ));
}

/// Private names go into the certificate and the grant's private list; `--connect` names
/// become access rules at enrollment; rules are granted and taken back for enrolled
/// agents only.
#[test]
fn private_names_and_access_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let token = ca
        .create_token(
            &NewToken {
                agent: "laptop".into(),
                hosts: vec![],
                private_hosts: vec!["Dev.Internal".into()],
                connect: vec!["db.internal".into()],
                ttl: Duration::from_secs(3600),
                cert_ttl: Duration::from_secs(24 * 3600),
                server: None,
            },
            now(),
        )
        .unwrap();
    let done = enroll(&ca, &token, &csr(&[]).1, now()).unwrap();
    assert_eq!(
        done.hosts,
        ["dev.internal"],
        "private names are in the certificate"
    );
    let state = ca.state().read().unwrap();
    assert!(state.agents["laptop"].hosts.is_empty());
    assert_eq!(state.agents["laptop"].private, ["dev.internal"]);
    assert_eq!(state.access["laptop"], ["db.internal"]);

    assert_eq!(
        ca.allow_access("laptop", &["*.svc.internal".into(), "db.internal".into()])
            .unwrap(),
        ["db.internal", "*.svc.internal"]
    );
    assert_eq!(
        ca.revoke_access("laptop", &["db.internal".into()]).unwrap(),
        ["*.svc.internal"]
    );
    assert_eq!(
        ca.list_access().unwrap(),
        [("laptop".to_string(), vec!["*.svc.internal".to_string()])]
    );
    assert!(ca
        .revoke_access("laptop", &["*.svc.internal".into()])
        .unwrap()
        .is_empty());
    assert!(
        ca.list_access().unwrap().is_empty(),
        "an agent with no rules is not listed"
    );
    assert!(matches!(
        ca.allow_access("ghost", &["db.internal".into()]),
        Err(CaError::UnknownCert(_))
    ));
}

/// Names `ca init --san` adds are recorded in the state: a proxy whose certificate lacks
/// one (another proxy's directory on a shared store) reissues at its next check, keeping
/// its id; one that has them all keeps its certificate.
#[test]
fn added_server_names_reach_every_proxy_at_its_next_check() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let first = ca.server_identity(now(), None).unwrap();
    let added = ca
        .add_server_names(&["proxy.example.com".into(), "localhost".into()], now())
        .unwrap();
    assert_eq!(added.added, ["proxy.example.com"]);
    assert!(added.reissued);
    let second = ca.server_identity(now(), None).unwrap();
    assert_ne!(second.chain_pem, first.chain_pem);
    assert_eq!(second.proxy_id, first.proxy_id);
    assert_eq!(
        ca.server_identity(now(), None).unwrap().chain_pem,
        second.chain_pem
    );

    // Another process adds a name to the shared state; this proxy's next check picks it up.
    let store: &Arc<dyn revproxy_ca::Store> = ca.state();
    store
        .update(|tx| {
            let mut settings = tx.settings()?;
            settings.server_sans.push("more.example.com".into());
            tx.put_settings(settings)
        })
        .unwrap();
    let third = ca.server_identity(now(), None).unwrap();
    let summary = revproxy_ca::CertSummary::from_pem(&third.chain_pem).unwrap();
    assert!(summary.dns_names.contains(&"more.example.com".to_string()));
    assert!(summary.dns_names.contains(&"proxy.example.com".to_string()));
    assert_eq!(third.proxy_id, first.proxy_id);
    // A CA made with the default names takes the first added name as its enrollment host.
    assert_eq!(
        ca.default_server().unwrap().address(),
        "proxy.example.com:7443"
    );
}

mod renewal;
mod store;
