//! Renewal: the same identity again, once per certificate, not before half its lifetime.

use super::*;

#[test]
fn renewal_reissues_the_same_identity_and_refuses_revoked_expired_or_unknown_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["app.example.com"]);
    let (_, csr_pem) = csr(&[]);
    let at = now();
    let first = enroll(&ca, &t, &csr_pem, at).unwrap();

    let (_, renew_csr) = csr(&["evil.example.com"]);
    let later = at + ::time::Duration::hours(16);
    let second = ca
        .renew(&first.serial, &renew_csr, later, MIN_RENEWAL_AGE_PERCENT)
        .unwrap();
    assert_eq!(
        (second.agent.as_str(), &second.hosts),
        ("web-1", &first.hosts)
    );
    assert_ne!(second.serial, first.serial);
    assert_eq!(
        second.not_after - later.unix_timestamp(),
        24 * 3600,
        "same lifetime"
    );

    let expired = at + ::time::Duration::hours(25);
    assert!(matches!(
        ca.renew(&first.serial, &renew_csr, expired, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::CertExpired)
    ));
    assert!(matches!(
        ca.renew("00", &renew_csr, later, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::UnknownCert)
    ));
    ca.revoke_certs("web-1", later).unwrap();
    assert!(matches!(
        ca.renew(&second.serial, &renew_csr, later, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::CertRevoked)
    ));
}

/// A renewal is one certificate for one certificate: a retry with the same key gets the
/// same successor (without rewriting the state), another key is refused while that
/// successor is live, and nothing is renewed before half its lifetime.
#[test]
fn each_certificate_renews_once_and_not_before_half_its_lifetime() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path());
    let t = token(&ca, &["app.example.com"]);
    let at = now();
    let first = enroll(&ca, &t, &csr(&[]).1, at).unwrap();
    let (_, key_a) = csr(&[]);
    let (_, key_b) = csr(&[]);

    // 24 h certificate: at 11 h it is too early, and says for how long.
    let early = at + ::time::Duration::hours(11);
    match ca.renew(&first.serial, &key_a, early, MIN_RENEWAL_AGE_PERCENT) {
        Err(e @ EnrollError::TooEarly { wait_secs, .. }) => {
            assert!((3540..=3660).contains(&wait_secs), "{wait_secs}");
            assert_eq!((e.code(), e.retry_after()), ("too_early", Some(wait_secs)));
        }
        other => panic!("{other:?}"),
    }

    let due = at + ::time::Duration::hours(13);
    let second = ca
        .renew(&first.serial, &key_a, due, MIN_RENEWAL_AGE_PERCENT)
        .unwrap();
    assert!(!second.reissued);
    let written = state_bytes(tmp.path());

    // The answer was lost; the agent retries with the same key.
    let again = ca
        .renew(
            &first.serial,
            &key_a,
            due + ::time::Duration::minutes(5),
            50,
        )
        .unwrap();
    assert!(again.reissued);
    assert_eq!(
        (again.serial, again.cert_pem),
        (second.serial.clone(), second.cert_pem.clone())
    );
    assert_eq!(state_bytes(tmp.path()), written, "nothing rewritten");

    // Another key (a copy of the identity elsewhere) gets nothing.
    for _ in 0..3 {
        match ca.renew(&first.serial, &key_b, due, MIN_RENEWAL_AGE_PERCENT) {
            Err(EnrollError::AlreadyRenewed { successor }) => assert_eq!(successor, second.serial),
            other => panic!("{other:?}"),
        }
    }
    let ours = |ca: &Ca| {
        ca.list_certs(due)
            .unwrap()
            .into_iter()
            .filter(|c| c.agent == "web-1")
            .count()
    };
    assert_eq!(ours(&ca), 2, "one enrollment and one renewal");

    // The successor itself is new: not due for another half lifetime.
    assert!(matches!(
        ca.renew(&second.serial, &key_b, due, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::TooEarly { .. })
    ));

    // Revoking the successor does not reopen renewal: a thief with a copy of the first
    // certificate would renew it again at once. Nor does the revoked one come back.
    ca.revoke_certs(&second.serial, due).unwrap();
    assert!(matches!(
        ca.renew(&first.serial, &key_b, due, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::AlreadyRenewed { .. })
    ));
    assert!(matches!(
        ca.renew(&first.serial, &key_a, due, MIN_RENEWAL_AGE_PERCENT),
        Err(EnrollError::CertRevoked)
    ));
    assert_eq!(ours(&ca), 2);
}
