//! A snapshot brought up to date by the records that changed ([`revproxy_ca::Changes`]),
//! each applied by its key: a revocation, an enrollment or a renewal costs the proxy what
//! it touches, not a read of the whole state (100,000 agents' worth of records took
//! seconds to read and parse, docs/benchmarks.md).

use revproxy_ca::state::AgentGrant;
use revproxy_ca::{Changed, Changes};

use super::{secret_hash, Snapshot};

impl Snapshot {
    /// This snapshot with `changes` applied; `now` decides which tokens are still open.
    pub(super) fn with_changes(&self, changes: &Changes, now: i64) -> Snapshot {
        let mut s = self.clone();
        for changed in &changes.records {
            match changed {
                Changed::Token(id, token) => {
                    s.open_tokens.remove(id);
                    s.token_secrets.remove(id);
                    if let Some(t) = token {
                        if let Some(hash) = secret_hash(&t.secret_sha256) {
                            s.token_secrets.insert(id.clone(), hash);
                        }
                        if t.used.is_none() && !t.revoked && t.expires > now {
                            s.open_tokens.insert(id.clone());
                        }
                    }
                }
                Changed::Cert {
                    serial,
                    cert,
                    of_agent,
                } => {
                    s.live.remove(serial);
                    s.revoked.remove(serial);
                    // A certificate gone from the store (pruned a week after it expired)
                    // is neither: TLS refuses it as expired anyway.
                    if let Some(c) = cert {
                        match c.revoked_at {
                            Some(_) => s.revoked.insert(serial.clone()),
                            None => s.live.insert(serial.clone()),
                        };
                        let latest = (of_agent.iter())
                            .filter(|c| c.revoked_at.is_none())
                            .map(|c| c.not_after)
                            .max();
                        match latest {
                            Some(latest) => s.expiry.insert(c.agent.clone(), latest),
                            None => s.expiry.remove(&c.agent),
                        };
                    }
                }
                Changed::Grant(agent, grant) => {
                    s.drop_grant(agent);
                    if let Some(grant) = grant {
                        s.add_grant(agent, grant);
                    }
                }
                Changed::Access(agent, names) => {
                    if names.is_empty() {
                        s.access.remove(agent);
                    } else {
                        s.access.insert(agent.clone(), names.clone());
                    }
                }
                Changed::Operator(serial, operator) => {
                    s.operators.remove(serial);
                    s.revoked.remove(serial);
                    if let Some(o) = operator {
                        match o.revoked_at {
                            Some(_) => s.revoked.insert(serial.clone()),
                            None => s.operators.insert(serial.clone()),
                        };
                    }
                }
                Changed::Tls(name, record) => match record {
                    Some(r) => {
                        s.tls.insert(name.clone(), std::sync::Arc::new(r.clone()));
                    }
                    None => {
                        s.tls.remove(name);
                    }
                },
                Changed::Settings => {}
            }
        }
        s
    }

    fn drop_grant(&mut self, agent: &str) {
        self.grants.remove(agent);
        self.public.remove(agent);
        for pattern in self.private_of.remove(agent).unwrap_or_default() {
            if let Some(count) = self.private.get_mut(&pattern) {
                *count -= 1;
                if *count == 0 {
                    self.private.remove(&pattern);
                }
            }
        }
    }

    fn add_grant(&mut self, agent: &str, grant: &AgentGrant) {
        for pattern in &grant.private {
            *self.private.entry(pattern.clone()).or_default() += 1;
        }
        let all = grant.hosts.iter().chain(&grant.private).cloned().collect();
        self.grants.insert(agent.to_string(), all);
        self.public.insert(agent.to_string(), grant.hosts.clone());
        self.private_of
            .insert(agent.to_string(), grant.private.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use revproxy_ca::records::Tx;
    use revproxy_ca::sqlite::SqliteStore;
    use revproxy_ca::state::{CertRecord, OperatorRecord, State, TokenRecord};
    use revproxy_ca::{CaError, Store};

    use super::*;

    fn cert(serial: &str, agent: &str, not_after: i64) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            agent: agent.into(),
            hosts: vec![format!("{agent}.example.com")],
            not_before: 0,
            not_after,
            revoked_at: None,
            pem: String::new(),
            renewed: None,
        }
    }

    fn token(id: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            agent: "web".into(),
            hosts: vec!["web.example.com".into()],
            secret_sha256: "ab".repeat(32),
            created: 0,
            expires: i64::MAX,
            cert_ttl_secs: 3600,
            revoked: false,
            used: None,
            private_hosts: Vec::new(),
            connect: Vec::new(),
        }
    }

    /// One change of the sequence below.
    type Step = Box<dyn FnOnce(&mut dyn Tx) -> Result<(), CaError> + Send>;

    fn change(store: &Arc<dyn Store>, f: impl FnOnce(&mut dyn Tx) -> Result<(), CaError> + Send) {
        store.update(f).unwrap();
    }

    /// Every kind of change applied by key gives the snapshot a whole read gives, across
    /// a sequence of enrollments, renewals, revocations, grant and access changes.
    #[test]
    fn changes_applied_by_key_match_a_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::new(dir.path()));
        store
            .create(&State {
                version: State::VERSION,
                ..State::default()
            })
            .unwrap();
        let mut version = store.version().unwrap();
        let mut snapshot = Snapshot::load(&*store).unwrap();
        let steps: Vec<Step> = vec![
            Box::new(|tx| {
                tx.put_token(token("t1"))?;
                tx.put_token(token("t2"))
            }),
            Box::new(|tx| {
                let mut t = tx.token("t1")?.unwrap();
                t.used = Some(revproxy_ca::state::Traded {
                    at: 1,
                    spki_sha256: String::new(),
                    serial: "c1".into(),
                });
                tx.put_token(t)?;
                tx.put_cert(cert("c1", "web", 100))?;
                tx.put_grant(
                    "web",
                    AgentGrant {
                        hosts: vec!["web.example.com".into()],
                        private: vec!["db.internal".into()],
                    },
                )?;
                tx.put_grant(
                    "api",
                    AgentGrant {
                        hosts: Vec::new(),
                        private: vec!["db.internal".into()],
                    },
                )
            }),
            // A renewal, then a revocation of the older certificate.
            Box::new(|tx| tx.put_cert(cert("c2", "web", 200))),
            Box::new(|tx| {
                let mut c = tx.cert("c2")?.unwrap();
                c.revoked_at = Some(5);
                tx.put_cert(c)
            }),
            Box::new(|tx| {
                let mut t = tx.token("t2")?.unwrap();
                t.revoked = true;
                tx.put_token(t)?;
                tx.put_access("web", vec!["api.example.com".into()])?;
                tx.put_operator(OperatorRecord {
                    serial: "o1".into(),
                    name: "alice".into(),
                    not_before: 0,
                    not_after: 100,
                    revoked_at: None,
                })
            }),
            // One private grant goes; the pattern stays private while another holds it.
            Box::new(|tx| {
                tx.put_grant(
                    "web",
                    AgentGrant {
                        hosts: vec!["web.example.com".into()],
                        private: Vec::new(),
                    },
                )?;
                tx.put_access("web", Vec::new())
            }),
        ];
        for step in steps {
            change(&store, step);
            let changes = store
                .changes_since(version)
                .unwrap()
                .expect("the store keeps a feed");
            version = changes.version;
            snapshot = snapshot.with_changes(&changes, 10);
            let whole = Snapshot::load(&*store).unwrap();
            assert_eq!(
                format!("{:?}", sorted(&snapshot)),
                format!("{:?}", sorted(&whole))
            );
        }
        assert!(snapshot.is_private("db.internal"));
        assert_eq!(snapshot.expiry["web"], 100);
        assert!(snapshot.revoked.contains("c2") && snapshot.live.contains("c1"));
        assert!(store
            .changes_since(version)
            .unwrap()
            .unwrap()
            .records
            .is_empty());
        assert!(
            store.changes_since(version + 5).unwrap().is_none(),
            "a state that went back"
        );
    }

    /// The snapshot's collections in a comparable order.
    fn sorted(s: &Snapshot) -> Vec<Vec<String>> {
        fn keys<T: std::fmt::Debug>(m: impl IntoIterator<Item = T>) -> Vec<String> {
            let mut v: Vec<String> = m.into_iter().map(|x| format!("{x:?}")).collect();
            v.sort();
            v
        }
        vec![
            keys(&s.revoked),
            keys(&s.live),
            keys(&s.open_tokens),
            keys(s.token_secrets.keys()),
            keys(&s.grants),
            keys(&s.public),
            keys(&s.private_of),
            keys(&s.private),
            keys(&s.access),
            keys(&s.expiry),
            keys(&s.operators),
        ]
    }
}
