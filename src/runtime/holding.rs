//! A future that holds something (a permit, a unit of load) for as long as the future is
//! held (a task's is dropped as it ends), and [`unbox`].
//!
//! The obvious way, `async move { work.await; drop(permit) }`, keeps two copies of `work`:
//! the one the block captured and the one it awaits (rustc lays them out side by side). A
//! connection's whole handling is kilobytes, and a task holds it for the connection's life:
//! an idle tunnel paid for its handling twice (docs/benchmarks.md, issue 33).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The value in `boxed`, its box freed now. `*boxed` in an async function would leave the
/// box allocated, empty, until the function returns: for a tunnel's handling, its life.
#[allow(clippy::boxed_local)] // taking the box is the point: it is freed here
pub(crate) fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

pin_project_lite::pin_project! {
    /// `work`, with `held` dropped when it is (after it completed, or cancelled).
    pub(crate) struct Holding<F, H> {
        #[pin]
        work: F,
        held: H,
    }
}

impl<F, H> Holding<F, H> {
    pub(crate) fn new(work: F, held: H) -> Holding<F, H> {
        Holding { work, held }
    }
}

impl<F: Future, H> Future for Holding<F, H> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().work.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_is_held_is_let_go_when_the_work_is_dropped_and_not_before() {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let done = tokio::spawn(Holding::new(
            rx,
            permits.clone().try_acquire_owned().unwrap(),
        ));
        let cancelled = tokio::spawn(Holding::new(
            std::future::pending::<()>(),
            permits.clone().try_acquire_owned().unwrap(),
        ));
        tokio::task::yield_now().await;
        assert_eq!(permits.available_permits(), 0, "held while the work runs");
        tx.send(7).unwrap();
        assert_eq!(done.await.unwrap(), Ok(7));
        assert_eq!(permits.available_permits(), 1, "let go once it is done");
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(
            permits.available_permits(),
            2,
            "let go once it is cancelled"
        );
    }

    /// Work that awaits with a large value alive across the await, as a connection's
    /// handling does.
    async fn large_work() -> usize {
        let big = [1u8; 4096];
        std::future::ready(()).await;
        big.len()
    }

    #[test]
    fn it_holds_one_copy_of_the_work_where_an_async_block_holds_two() {
        let size = std::mem::size_of_val(&large_work());
        let holding = Holding::new(large_work(), ());
        assert!(std::mem::size_of_val(&holding) < size + 64);
        // Why it exists (if rustc lays the two copies over each other one day, a block
        // will do again).
        let (work, held) = (large_work(), String::new());
        let block = async move {
            let done = work.await;
            drop(held);
            done
        };
        assert!(std::mem::size_of_val(&block) >= 2 * size);
    }
}
