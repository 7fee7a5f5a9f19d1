//! Stream metering: the limits that bound one stream's sockets, the counters it moves
//! bytes into (metrics), and the idle clock. No I/O of its own beyond wrapping a socket.

use std::sync::Arc;
use std::time::Duration;

use super::{Budget, Receiving, SEND_TIMEOUT};

/// What bounds the sockets of one stream, from the proxy's or the agent's configuration.
#[derive(Clone, Debug)]
pub(crate) struct StreamLimits {
    /// A socket that accepts no byte this long: the stream is reset ([`SEND_TIMEOUT`]).
    pub(crate) send_timeout: Duration,
    /// No byte either way this long: the stream is closed. Off unless configured: an idle
    /// SSH or database session is not a fault.
    pub(crate) idle_timeout: Option<Duration>,
    /// What all streams of the process may hold ([`Budget`]); each stream counts in it
    /// while its [`Meter`] lives.
    pub(crate) budget: Arc<Budget>,
}

impl Default for StreamLimits {
    /// The agent's: no budget, its streams keep the full window ([`super::STREAM_WINDOW`]).
    fn default() -> Self {
        StreamLimits {
            send_timeout: SEND_TIMEOUT,
            idle_timeout: None,
            budget: Arc::new(Budget::unlimited()),
        }
    }
}

/// Where one stream counts what it moves, as it moves it (metrics): bytes read from and
/// written to its socket, and an open-streams gauge held up for the stream's life. The
/// default counts nothing. Each count is one relaxed atomic add per chunk moved.
#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    read: Option<prometheus::IntCounter>,
    written: Option<prometheus::IntCounter>,
    open: Option<prometheus::IntGauge>,
}

impl StreamCounters {
    /// Counts into `read` and `written`, and holds `open` one higher until dropped.
    pub(crate) fn new(
        read: prometheus::IntCounter,
        written: prometheus::IntCounter,
        open: prometheus::IntGauge,
    ) -> StreamCounters {
        open.inc();
        StreamCounters {
            read: Some(read),
            written: Some(written),
            open: Some(open),
        }
    }
}

impl StreamCounters {
    /// `n` bytes were read from the stream's socket.
    pub(crate) fn read(&self, n: usize) {
        if let Some(c) = &self.read {
            c.inc_by(n as u64);
        }
    }

    /// `n` bytes were written to the stream's socket.
    pub(crate) fn written(&self, n: usize) {
        if let Some(c) = &self.written {
            c.inc_by(n as u64);
        }
    }
}

/// A socket whose reads and writes are counted into [`StreamCounters`] as they happen
/// (for a plain copy, such as a static route's).
pub(crate) struct Counted<'a, S> {
    inner: &'a mut S,
    counters: &'a StreamCounters,
    /// Bytes read and written so far.
    pub(crate) totals: (u64, u64),
}

impl<'a, S> Counted<'a, S> {
    pub(crate) fn new(inner: &'a mut S, counters: &'a StreamCounters) -> Self {
        Counted {
            inner,
            counters,
            totals: (0, 0),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.counters.read(n);
        this.totals.0 += n as u64;
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            this.counters.written(n);
            this.totals.1 += n as u64;
        }
        polled
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Drop for StreamCounters {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

/// What a stream's pumps report as bytes move: the counters, and when the stream last
/// moved a byte either way, for the idle timeout (one clock read and one atomic store per
/// chunk, and nothing at all when no idle timeout is set).
pub(crate) struct Meter {
    limit: Option<Duration>,
    /// The stream's place in the budget, given back as the meter drops.
    _receiving: Receiving,
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last byte moved.
    last: std::sync::atomic::AtomicU64,
    counters: StreamCounters,
    /// Bytes read from and written to the socket so far, whatever becomes of the stream.
    read_total: std::sync::atomic::AtomicU64,
    written_total: std::sync::atomic::AtomicU64,
}

impl Meter {
    /// A meter for a stream under `limits`.
    pub(crate) fn new(limits: &StreamLimits, counters: StreamCounters) -> Meter {
        Meter {
            limit: limits.idle_timeout,
            _receiving: limits.budget.receiving(),
            start: tokio::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
            counters,
            read_total: std::sync::atomic::AtomicU64::new(0),
            written_total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `n` bytes were read from the socket (and sent on into the tunnel).
    pub(crate) fn read(&self, n: usize) {
        self.counters.read(n);
        self.read_total
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes were written to the socket.
    pub(crate) fn written(&self, n: usize) {
        self.counters.written(n);
        self.written_total
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    /// Bytes (read from, written to) the socket so far.
    pub(crate) fn totals(&self) -> (u64, u64) {
        (
            self.read_total.load(std::sync::atomic::Ordering::Relaxed),
            self.written_total
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn touch(&self) {
        if self.limit.is_some() {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Completes (with the error to end the stream with) once nothing moved for the
    /// limit; never without one.
    pub(crate) async fn idle(&self) -> std::io::Error {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
            let due = self.start + Duration::from_millis(last) + limit;
            if tokio::time::Instant::now() >= due {
                return std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no byte either way for {limit:?}"),
                );
            }
            tokio::time::sleep_until(due).await;
        }
    }
}
