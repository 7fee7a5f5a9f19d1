//! One certificate order (RFC 8555 section 7.4), for one name: the order, its
//! authorization's challenge answered through the store, finalization with a fresh
//! P-256 key, the chain.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use revproxy_ca::state::{Challenge, TlsRecord};
use revproxy_ca::Ca;

use super::ChallengeKind;

/// Longest the challenge may take to reach this proxy's own snapshot through the store.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Then, time for every other proxy on the store to see it too (each checks for changes
/// every second, or hears them at once on PostgreSQL) before the CA is told to look.
const PROPAGATION: Duration = Duration::from_secs(2);

/// What an order needs from the proxy running it.
pub(super) struct OrderCtx<'a> {
    pub(super) ca: &'a Arc<Ca>,
    /// This proxy's id, the holder of the name's lease.
    pub(super) me: &'a str,
    pub(super) challenge: ChallengeKind,
    /// The terminated names as this proxy sees them now.
    pub(super) records: &'a (dyn Fn() -> Vec<Arc<TlsRecord>> + Send + Sync),
}

/// Why an order ended without a certificate.
pub(super) struct Failed {
    /// `invalid` (the CA refused: a failed validation, a rate limit) or `error` (it could
    /// not be asked, or took too long).
    pub(super) result: &'static str,
    pub(super) reason: String,
    /// The CA refused for its rate limits (`rateLimited`).
    pub(super) rate_limited: bool,
}

impl Failed {
    /// An order that could not be made, or whose outcome cannot be used.
    pub(super) fn error(reason: impl Into<String>) -> Failed {
        failed("error", reason)
    }
}

impl From<instant_acme::Error> for Failed {
    fn from(e: instant_acme::Error) -> Failed {
        let (result, rate_limited) = match &e {
            instant_acme::Error::Api(p) => (
                "invalid",
                p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited"),
            ),
            _ => ("error", false),
        };
        Failed {
            result,
            reason: describe(&e),
            rate_limited,
        }
    }
}

fn failed(result: &'static str, reason: impl Into<String>) -> Failed {
    Failed {
        result,
        reason: reason.into(),
        rate_limited: false,
    }
}

/// A CA's problem document in one line.
pub(super) fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => {
            let mut text = format!(
                "{} ({})",
                p.detail.as_deref().unwrap_or("refused"),
                p.r#type.as_deref().unwrap_or("no problem type")
            );
            for sub in &p.subproblems {
                if let Some(detail) = &sub.detail {
                    text.push_str(&format!("; {detail}"));
                }
            }
            text
        }
        e => e.to_string(),
    }
}

/// Orders a certificate for `name` with `account`: its chain and key (PEM). A renewal
/// names the certificate it `replaces` (ARI, RFC 9773: Let's Encrypt exempts such orders
/// from its limits); a CA that takes no such field gets the order without it.
pub(super) async fn order(
    ctx: &OrderCtx<'_>,
    account: &Account,
    name: &str,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<(String, String), Failed> {
    let ids = [Identifier::Dns(name.to_string())];
    let plain = || NewOrder::new(&ids);
    let mut order = match replaces {
        Some(id) => match account.new_order(&plain().replaces(id)).await {
            Ok(order) => order,
            // No renewal information at this CA, or it will not have this certificate
            // replaced (replaced already, say): ordered as a new certificate. Anything
            // else (a rate limit above all) fails the order as it is.
            Err(instant_acme::Error::Unsupported(_)) => account.new_order(&plain()).await?,
            Err(instant_acme::Error::Api(p)) if replaced_refused(&p) => {
                tracing::info!(host = %name, problem = ?p.r#type, detail = ?p.detail, "the CA will not have the certificate replaced; ordering a new one");
                account.new_order(&plain()).await?
            }
            Err(e) => return Err(e.into()),
        },
        None => account.new_order(&plain()).await?,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(failed("invalid", format!("authorization is {other:?}"))),
        }
        let kind = match ctx.challenge {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        };
        let mut challenge = authz.challenge(kind).ok_or_else(|| {
            let offered = ctx.challenge.name();
            failed(
                "invalid",
                format!("the CA does not offer {offered} for {name}"),
            )
        })?;
        let key_authorization = challenge.key_authorization();
        let answer = match ctx.challenge {
            ChallengeKind::Http01 => Challenge::Http01 {
                token: challenge.token.clone(),
                key_authorization: key_authorization.as_str().to_string(),
            },
            ChallengeKind::TlsAlpn01 => Challenge::TlsAlpn01 {
                digest: revproxy_ca::hex::encode(key_authorization.digest().as_ref()),
            },
        };
        publish(ctx, name, answer).await?;
        challenge.set_ready().await?;
    }
    // The CA validates within seconds (Let's Encrypt: from several places); pebble and
    // Let's Encrypt both say when to look again, which the policy honours.
    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_secs(1))
        .backoff(1.5)
        .timeout(Duration::from_secs(120));
    let status = order.poll_ready(&policy).await?;
    if status != OrderStatus::Ready {
        let why = (order.state().error.as_ref())
            .map(|p| p.detail.clone().unwrap_or_default())
            .unwrap_or_default();
        return Err(failed("invalid", format!("order is {status:?}: {why}")));
    }
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&policy).await?;
    Ok((chain_pem, key_pem))
}

/// Whether the CA refused an order only for the certificate it `replaces` (RFC 9773:
/// replaced already, or not one it knows).
fn replaced_refused(problem: &instant_acme::Problem) -> bool {
    matches!(
        problem.r#type.as_deref(),
        Some("urn:ietf:params:acme:error:alreadyReplaced" | "urn:ietf:params:acme:error:malformed")
    )
}

/// Puts `answer` in the store, and waits until the proxies can give it.
async fn publish(ctx: &OrderCtx<'_>, name: &str, answer: Challenge) -> Result<(), Failed> {
    let (ca, n, me, a) = (
        ctx.ca.clone(),
        name.to_string(),
        ctx.me.to_string(),
        answer.clone(),
    );
    let stored = tokio::task::spawn_blocking(move || ca.acme_challenge(&n, &me, Some(a)))
        .await
        .map_err(|e| failed("error", e.to_string()))?
        .map_err(|e| failed("error", format!("cannot store the challenge: {e}")))?;
    if !stored {
        return Err(failed(
            "error",
            "the lease was lost (passed through, or taken over)",
        ));
    }
    let seen = async {
        loop {
            let records = (ctx.records)();
            let mine = records.iter().find(|r| r.name == name);
            if mine.and_then(|r| r.acme.challenge.as_ref()) == Some(&answer) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PUBLISH_TIMEOUT, seen).await.map_err(|_| {
        failed("error", format!("the challenge did not reach this proxy's view of the store within {PUBLISH_TIMEOUT:?}"))
    })?;
    tokio::time::sleep(PROPAGATION).await;
    Ok(())
}
