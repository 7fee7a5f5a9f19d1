//! Private names (the mesh): names only enrolled identities with access reach, through
//! their own tunnel; never a public listener.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A privately granted name is not there for public clients: by Host, by SNI and by a
/// fixed listener they get what an unknown name gets, even with its agent connected, and
/// a wildcard granted privately hides every name under it.
async fn a_public_listener_never_reaches_a_private_name(t: Transport) {
    let (fixed, fixed_addr) = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        (tokio::net::TcpListener::from_std(l).unwrap(), addr)
    };
    let proxy = TestProxy::start_with(move |b| {
        b.listener(
            fixed,
            revproxy::ListenerKind::Fixed(revproxy::Target::Name("db.internal".into())),
        )
        .route("db.internal", "127.0.0.1:1")
    })
    .await;
    let backend = echo_backend(b"secret:").await;
    let dir = enroll_mesh_agent(
        &proxy,
        "db-1",
        &["public.example.com"],
        &["db.internal", "*.svc.internal"],
        &[],
    )
    .await;
    let _agent = start_agent(
        dir.path(),
        &[
            ("db.internal", backend),
            ("*.svc.internal", backend),
            ("public.example.com", backend),
        ],
        on(t),
    );
    proxy.wait_for("public.example.com", 1).await;

    // The public name works; the private ones answer like a name nobody has.
    let public = round_trip(proxy.http, &http_head("public.example.com"), b"")
        .await
        .unwrap();
    assert!(public.starts_with(b"secret:"));
    for name in ["db.internal", "a.svc.internal", "nobody.example.com"] {
        let back = round_trip(proxy.http, &http_head(name), b"").await.unwrap();
        let text = String::from_utf8_lossy(&back);
        assert!(text.starts_with("HTTP/1.1 502"), "{name}: {text}");
        assert!(
            text.contains(&format!("no route for {name}")),
            "{name}: {text}"
        );
        assert!(!text.contains("secret"), "{name}: {text}");
    }
    // By SNI: a real TLS client gets the alert for an unrecognized name.
    let config = revproxy::tls::pinned_client_config(vec![proxy.pin()], &[]).unwrap();
    let tcp = TcpStream::connect(proxy.sni).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("db.internal".try_into().unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("UnrecognisedName"), "{err:?}");
    // A fixed listener for the private name is closed at once, without a byte.
    let mut fixed = TcpStream::connect(fixed_addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), fixed.read_to_end(&mut got))
        .await
        .expect("closed, not hanging")
        .ok();
    assert!(got.is_empty(), "{got:?}");
}

over_both_transports!(a_public_listener_never_reaches_a_private_name);
