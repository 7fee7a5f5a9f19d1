//! Reading ahead under a budget: how a pump takes a tunnel stream's bytes before its
//! socket can take them, and the budget, one per process, that bounds all of it.
//!
//! The proxy's transports give each stream a small receive window ([`PROXY_STREAM_WINDOW`]):
//! that much the agent may send before the proxy has taken any of it. The pump takes
//! bytes out of the transport as they arrive, which hands the agent that much credit
//! again, and keeps them until its socket accepts them. Up to [`MIN_AHEAD`] it always
//! may; beyond that, up to [`MAX_AHEAD`], only while the process-wide [`Budget`] has room
//! and only as far as its reader has drained in the last second (a reader that takes little
//! gets little). So a stream whose reader stopped pins at most the window and
//! `MIN_AHEAD`, everything above that is counted in one budget, and a budget that is spent
//! slows streams down (their windows stay small) rather than ending any.
//!
//! [`PROXY_STREAM_WINDOW`]: super::PROXY_STREAM_WINDOW

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::Instant;

use super::Meter;

/// What a pump may always hold of a stream's bytes, budget or not: a write's worth.
pub(crate) const MIN_AHEAD: usize = 64 * 1024;
/// Most a pump holds of one stream's bytes: with the window, the 2 MiB a stream had in
/// flight before there was a budget ([`super::STREAM_WINDOW`]).
pub(crate) const MAX_AHEAD: usize = (super::STREAM_WINDOW - super::PROXY_STREAM_WINDOW) as usize;
/// The span over which a reader's pace is taken: a stream may hold ahead what its reader
/// drained in about this long.
const PACE: Duration = Duration::from_secs(1);
/// Most chunks handed to one vectored write.
const WRITE_SLICES: usize = 64;

/// The bytes all streams of one process may hold beyond [`MIN_AHEAD`] each. Its use is
/// the gauge itself (one atomic, read and moved as streams take and write bytes).
#[derive(Debug)]
pub(crate) struct Budget {
    limit: i64,
    used: prometheus::IntGauge,
    /// Times a stream wanted to read further ahead and found the budget spent.
    spent: prometheus::IntCounter,
}

impl Budget {
    /// A budget of `limit` bytes, counted into `used` and `spent` (registered metrics, or
    /// fresh ones nobody reads).
    pub(crate) fn new(
        limit: u64,
        used: prometheus::IntGauge,
        spent: prometheus::IntCounter,
    ) -> Budget {
        Budget {
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            used,
            spent,
        }
    }

    /// A budget of `limit` bytes that no metric shows.
    pub(crate) fn unmetered(limit: u64) -> Budget {
        Budget::new(
            limit,
            prometheus::IntGauge::new("stream_buffer_bytes", "unregistered").expect("valid"),
            prometheus::IntCounter::new("stream_buffer_spent", "unregistered").expect("valid"),
        )
    }

    /// The bytes held against it now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.get().max(0) as u64
    }

    fn has_room(&self) -> bool {
        self.used.get() < self.limit
    }
}

/// The default budget: a sixteenth of the memory this process may use (the machine's, or
/// its control group's limit when lower), between 64 MiB and 1 GiB; 256 MiB when neither
/// can be read.
pub(crate) fn default_budget() -> u64 {
    const MIB: u64 = 1024 * 1024;
    match crate::runtime::memory::usable_memory() {
        Some(bytes) => (bytes / 16).clamp(64 * MIB, 1024 * MIB),
        None => 256 * MIB,
    }
}

/// Where a pump takes a stream's bytes from: the transport's receive side. Taking a chunk
/// hands its size back to the peer as credit (h2 releases capacity; quinn does so as it
/// is read).
pub(crate) trait Source {
    /// The next chunk, `None` at the stream's end.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>>;
}

/// The bytes a pump holds for its socket, and what they cost against the budget.
struct Held<'a> {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// Held beyond [`MIN_AHEAD`], counted in the budget.
    charged: usize,
    budget: &'a Budget,
    /// The stream wants more than the budget gives (counted once per such spell).
    starved: bool,
    pace: Pace,
}

impl<'a> Held<'a> {
    fn new(budget: &'a Budget) -> Self {
        Held {
            queue: VecDeque::new(),
            bytes: 0,
            charged: 0,
            budget,
            starved: false,
            pace: Pace::default(),
        }
    }

    /// Whether to take another chunk from the transport now.
    fn wants_more(&mut self) -> bool {
        if self.bytes < MIN_AHEAD {
            return true;
        }
        if self.bytes >= self.pace.allowance() {
            return false;
        }
        let room = self.budget.has_room();
        if !room && !self.starved {
            self.budget.spent.inc();
        }
        self.starved = !room;
        room
    }

    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.bytes += chunk.len();
            self.queue.push_back(chunk);
            self.recharge();
        }
    }

    /// `n` bytes were written: drops them from the front.
    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        self.pace.drained(n);
        while n > 0 {
            let front = self.queue.front_mut().expect("written bytes were held");
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
        self.recharge();
    }

    /// Brings the budget's count of this stream's bytes up to date.
    fn recharge(&mut self) {
        let charged = self.bytes.saturating_sub(MIN_AHEAD);
        if charged != self.charged {
            self.budget.used.add(charged as i64 - self.charged as i64);
            self.charged = charged;
        }
    }

    /// The front chunks, as many as one write takes.
    fn slices<'s>(&'s self, out: &mut [IoSlice<'s>; WRITE_SLICES]) -> usize {
        let mut n = 0;
        for chunk in self.queue.iter().take(WRITE_SLICES) {
            out[n] = IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.used.sub(self.charged as i64);
    }
}

/// How fast a stream's reader drains, as the bytes written in the current and the last
/// [`PACE`] span: what the stream may hold ahead, between [`MIN_AHEAD`] and [`MAX_AHEAD`].
/// A reader that takes a byte a minute may hold no more than one that stopped.
#[derive(Default)]
struct Pace {
    since: Option<Instant>,
    current: usize,
    last: usize,
}

impl Pace {
    fn drained(&mut self, n: usize) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let elapsed = now.duration_since(since);
        if elapsed >= PACE {
            self.last = if elapsed < 2 * PACE { self.current } else { 0 };
            self.current = 0;
            self.since = Some(now);
        }
        self.current += n;
    }

    fn allowance(&self) -> usize {
        (self.current + self.last).clamp(MIN_AHEAD, MAX_AHEAD)
    }
}

/// Copies a tunnel stream into a socket until the stream ends (then returns the bytes
/// written; the caller shuts the socket's write side). `first` goes out before anything
/// taken from `source`. Takes bytes ahead of the socket within the budget (see the module
/// doc) and fails with `TimedOut` once the socket accepted no byte for `send_timeout`
/// while bytes waited.
pub(crate) async fn deliver(
    source: &mut impl Source,
    wr: &mut OwnedWriteHalf,
    first: Bytes,
    send_timeout: Duration,
    meter: &Meter,
) -> io::Result<u64> {
    let mut held = Held::new(meter.budget());
    held.push(first);
    let mut ended = false;
    let mut total = 0u64;
    // Armed when a write first finds the socket full; disarmed by any progress.
    let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| loop {
        while !ended && held.wants_more() {
            match source.poll_chunk(cx) {
                Poll::Ready(Some(Ok(chunk))) => held.push(chunk),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => ended = true,
                Poll::Pending => break,
            }
        }
        if held.bytes == 0 {
            return if ended {
                Poll::Ready(Ok(total))
            } else {
                Poll::Pending
            };
        }
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let count = held.slices(&mut slices);
        match Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..count]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                held.consume(n);
                meter.written(n);
                total += n as u64;
                stall = None;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                let timer = stall.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + send_timeout))
                });
                return match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(super::pump::stalled(send_timeout))),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_holds_its_minimum_whatever_the_budget() {
        let budget = Budget::unmetered(0);
        let mut held = Held::new(&budget);
        assert!(held.wants_more());
        held.push(Bytes::from(vec![0; MIN_AHEAD]));
        assert!(
            !held.wants_more(),
            "nothing beyond the minimum without budget"
        );
        assert_eq!(budget.used(), 0, "the minimum is not charged");
        held.consume(MIN_AHEAD);
        assert!(held.wants_more());
    }

    #[test]
    fn bytes_beyond_the_minimum_are_charged_until_written_or_dropped() {
        let budget = Budget::unmetered(1 << 30);
        let mut held = Held::new(&budget);
        held.pace.current = MAX_AHEAD; // a fast reader
        held.push(Bytes::from(vec![0; MIN_AHEAD + 1000]));
        assert_eq!(budget.used(), 1000);
        assert!(held.wants_more(), "a fast reader may read ahead");
        held.consume(500);
        assert_eq!(budget.used(), 500);
        held.push(Bytes::from(vec![0; 10]));
        drop(held);
        assert_eq!(budget.used(), 0, "a stream's end gives back its charge");
    }

    #[test]
    fn a_spent_budget_holds_every_stream_to_its_minimum_and_is_counted_once() {
        let budget = Budget::unmetered(100);
        let mut first = Held::new(&budget);
        first.pace.current = MAX_AHEAD;
        first.push(Bytes::from(vec![0; MIN_AHEAD + 100]));
        let mut second = Held::new(&budget);
        second.pace.current = MAX_AHEAD;
        second.push(Bytes::from(vec![0; MIN_AHEAD]));
        assert!(!second.wants_more());
        assert!(!second.wants_more());
        assert_eq!(budget.spent.get(), 1, "one spell, counted once");
        first.consume(100);
        assert!(second.wants_more(), "room again once the first wrote");
    }

    #[test]
    fn a_slow_reader_may_hold_no_more_than_it_drains() {
        let budget = Budget::unmetered(1 << 30);
        let mut held = Held::new(&budget);
        held.push(Bytes::from(vec![0; MIN_AHEAD]));
        held.consume(10);
        assert!(held.wants_more(), "below the minimum again");
        held.push(Bytes::from(vec![0; 10]));
        assert!(
            !held.wants_more(),
            "a reader that drained 10 bytes gets the minimum only"
        );
        held.pace.current = 200 * 1024;
        assert!(held.wants_more());
        held.push(Bytes::from(vec![0; 200 * 1024]));
        assert!(
            !held.wants_more(),
            "no more than it drained in the last second"
        );
        held.pace.current = 100 * MAX_AHEAD;
        assert_eq!(held.pace.allowance(), MAX_AHEAD);
    }

    #[test]
    fn written_bytes_leave_from_the_front_across_chunks() {
        let budget = Budget::unmetered(0);
        let mut held = Held::new(&budget);
        held.push(Bytes::from_static(b"abc"));
        held.push(Bytes::from_static(b"defg"));
        held.consume(4);
        let mut out = [IoSlice::new(&[]); WRITE_SLICES];
        let n = held.slices(&mut out);
        let left: Vec<u8> = out[..n].iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(left, b"efg");
        assert_eq!(held.bytes, 3);
    }
}
