//! Embeds a revproxy agent in a Rust program: the program serves its own backend on a
//! local port and publishes it through the proxy, with no separate agent process.
//!
//! `cargo run --example embed_agent -- STATE_DIR NAME` after `revproxy-agent enroll
//! --state STATE_DIR --token ...` with a token that grants NAME. Ctrl-C stops it.

use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(state), Some(name)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: embed_agent STATE_DIR NAME");
    };

    // The program's own backend: a tiny HTTP server on an ephemeral loopback port.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = backend.accept().await {
            tokio::spawn(async move {
                let body = "hello from an embedded revproxy agent\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    });

    let agent = revproxy::Agent::builder(&state)
        .service(&name, &backend_addr.to_string())
        .build()?;
    println!("serving {name} as {}", agent.identity().identity);
    agent
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    server.abort();
    Ok(())
}
