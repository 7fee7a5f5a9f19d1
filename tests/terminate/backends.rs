//! What the backend of a terminated name learns and speaks: the TLS facts in its PROXY v2
//! header, and HTTP/2 when its service says it speaks h2c.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::*;
use super::{http_backend, terminate_args, tls, NAME};

/// A backend that reads a PROXY v2 header, then answers with the TLVs it carried (type
/// and value, one per line) and closes.
async fn proxy_v2_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0u8; 16];
                tcp.read_exact(&mut head).await.unwrap();
                let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                head.resize(16 + len, 0);
                tcp.read_exact(&mut head[16..]).await.unwrap();
                let header = ppp::v2::Header::try_from(&head[..]).unwrap();
                let mut said = String::new();
                for tlv in header.tlvs() {
                    let tlv = tlv.unwrap();
                    said.push_str(&format!("{:#04x} {:?}\n", tlv.kind, tlv.value));
                }
                let _ = tcp.write_all(said.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// A service that asks for PROXY v2 behind a terminated name learns what the client and
/// the proxy agreed: ALPN `http/1.1` and TLS 1.3 (the TLVs HAProxy sends), beside the
/// name; over both transports.
#[tokio::test]
async fn the_backend_gets_the_tls_facts_in_its_proxy_v2_header() {
    let proxy = TestProxy::start().await;
    let agent_dir = enroll_agent(&proxy, "web-1", &[NAME]).await;
    let backend = proxy_v2_backend().await.to_string();
    let pki = OperatorCert::new(&[NAME]);
    tls(
        proxy.dir.path(),
        &terminate_args(NAME, &pki.cert(), &pki.key(), &[]),
    );
    let client = pki.client(&[b"h2", b"http/1.1"]);
    for t in [Transport::H2, Transport::Quic] {
        let backend = backend.clone();
        let agent = start_agent(agent_dir.path(), &[], move |b| {
            on(t)(b).service_with_proxy_protocol(NAME, &backend, revproxy::agent::ProxyProtocol::V2)
        });
        proxy.wait_for(NAME, 1).await;
        let said = tls_round_trip(proxy.sni, &client, NAME, b"").await.unwrap();
        let said = String::from_utf8(said).unwrap();
        assert!(
            said.contains(r#"0x01 [104, 116, 116, 112, 47, 49, 46, 49]"#),
            "ALPN http/1.1 ({t:?}): {said}"
        );
        assert!(
            said.contains(&format!("0x02 {:?}", NAME.as_bytes())),
            "{said}"
        );
        let ssl = [&[1u8, 0, 0, 0, 0, 0x21, 0, 7][..], b"TLSv1.3"].concat();
        assert!(
            said.contains(&format!("0x20 {ssl:?}")),
            "TLS 1.3 ({t:?}): {said}"
        );
        agent.stop().await;
        proxy.wait_for(NAME, 0).await;
    }
}

/// An HTTP/2 backend without TLS (h2c, prior knowledge): answers every request with
/// `h2c backend: PATH`.
async fn h2c_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = ::h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    let body = format!("h2c backend: {}", request.uri().path());
                    let response = http::Response::new(());
                    if let Ok(mut send) = respond.send_response(response, false) {
                        let _ = send.send_data(bytes::Bytes::from(body), true);
                    }
                }
            });
        }
    });
    addr
}

/// A service that declares it speaks h2c (`[[service]] h2c = true`) gets HTTP/2 from
/// clients that offer it (ALPN `h2`), over both transports; a service that does not
/// declare it gets HTTP/1.1 from the same client (curl offers both); and so does the h2c
/// service once its name's certificate covers another name too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_is_offered_only_for_services_that_speak_h2c() {
    let curl = tool("curl");
    let plain = "plain.example.com";
    let proxy = TestProxy::start().await;
    let agent_dir = enroll_agent(&proxy, "web-1", &[NAME, plain]).await;
    let (h2c, http1) = (
        h2c_backend().await.to_string(),
        http_backend().await.to_string(),
    );
    // A certificate for NAME alone, and one for both names.
    let (one, both) = (
        OperatorCert::new(&[NAME]),
        OperatorCert::new(&[NAME, plain]),
    );
    // Separate files: the two CAs have the same subject.
    let (one_ca, both_ca) = (
        one.dir.path().join("ca.pem"),
        both.dir.path().join("ca.pem"),
    );
    std::fs::write(&one_ca, &one.ca_pem).unwrap();
    std::fs::write(&both_ca, &both.ca_pem).unwrap();
    tls(
        proxy.dir.path(),
        &terminate_args(NAME, &one.cert(), &one.key(), &[]),
    );
    tls(
        proxy.dir.path(),
        &terminate_args(plain, &both.cert(), &both.key(), &[]),
    );
    let get = |name: &'static str| {
        let ca_file = if name == NAME { &one_ca } else { &both_ca };
        let mut command = std::process::Command::new(curl);
        command.args([
            "-sS",
            "--max-time",
            "10",
            "--http2",
            "-w",
            " %{http_version}",
            "--cacert",
        ]);
        command.arg(ca_file);
        command.args([
            "--resolve",
            &format!("{name}:{}:127.0.0.1", proxy.sni.port()),
        ]);
        command.arg(format!("https://{name}:{}/x", proxy.sni.port()));
        async move {
            let out = tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }
    };
    for t in [Transport::H2, Transport::Quic] {
        let (h2c, http1) = (h2c.clone(), http1.clone());
        let agent = start_agent(agent_dir.path(), &[], move |b| {
            on(t)(b)
                .service_with(
                    NAME,
                    &h2c,
                    revproxy::agent::ServiceOptions {
                        h2c: true,
                        ..Default::default()
                    },
                )
                .service(plain, &http1)
        });
        proxy.wait_for(NAME, 1).await;
        assert_eq!(get(NAME).await, "h2c backend: /x 2", "{t:?}");
        assert_eq!(
            get(plain).await,
            "backend got: GET /x HTTP/1.1\n 1.1",
            "{t:?}"
        );
        if t == Transport::Quic {
            // With a certificate that covers another name too, h2 is not offered: a browser
            // would send that name's requests down the same h2 connection.
            tls(
                proxy.dir.path(),
                &terminate_args(NAME, &both.cert(), &both.key(), &[]),
            );
            let client = both.client(&[b"h2", b"http/1.1"]);
            eventually("the two-name certificate is served", || async {
                let Ok(session) = connect_tls(proxy.sni, &client, NAME).await else {
                    return false;
                };
                session.get_ref().1.alpn_protocol() == Some(&b"http/1.1"[..])
            })
            .await;
        }
        agent.stop().await;
        proxy.wait_for(NAME, 0).await;
    }
}
