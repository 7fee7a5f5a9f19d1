//! The logs of the test and of the programs it starts: captured, watched, waited for.

use std::time::Duration;

/// Logs to the test's captured output; `RUST_LOG` sets the level (default: warn).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Log lines of this thread (a `#[tokio::test]` runs every task it spawns on its own
/// thread) from `level` up, one per event, as long as the guard lives: a test can await
/// what an agent or proxy says instead of guessing when it has said it.
pub fn watch_logs(
    level: tracing::Level,
) -> (
    tracing::subscriber::DefaultGuard,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    struct Lines(tokio::sync::mpsc::UnboundedSender<String>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || Lines(tx.clone()))
        .finish();
    (tracing::subscriber::set_default(subscriber), rx)
}

/// The lines a child writes on stderr (which must be piped), as they come.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    lines_to(stderr, tx);
    rx
}

/// Sends each line `from` gives to `to`, as they come, on a thread of its own (which
/// keeps reading after the receiver is gone, so the writer never blocks).
pub fn lines_to(from: impl std::io::Read + Send + 'static, to: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            let _ = to.send(line);
        }
    });
}

/// Waits (bounded) for a log line from [`watch_logs`] that contains `text`.
pub async fn log_line(
    logs: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    text: &str,
) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = logs.recv().await.expect("logs are watched");
            if line.contains(text) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {text:?} within 10 s"))
}
