//! A future that holds something (a permit, a unit of load) until it ends or is dropped.
//!
//! The obvious way, `async move { work.await; drop(permit) }`, keeps two copies of `work`:
//! the one the block captured and the one it awaits (rustc lays them out side by side). A
//! connection's whole handling is kilobytes, and a task holds it for the connection's life:
//! an idle tunnel paid for its handling twice (docs/benchmarks.md, issue 33).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

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
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let permit = permits.clone().try_acquire_owned().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let task = tokio::spawn(Holding::new(rx, permit));
        tokio::task::yield_now().await;
        assert_eq!(permits.available_permits(), 0, "held while the work runs");
        tx.send(7).unwrap();
        assert_eq!(task.await.unwrap(), Ok(7));
        assert_eq!(permits.available_permits(), 1, "let go once it is done");
    }

    #[test]
    fn it_holds_one_copy_of_the_work() {
        let work = async {
            let big = [1u8; 4096];
            std::future::ready(()).await;
            big.len()
        };
        let size = std::mem::size_of_val(&work);
        assert!(std::mem::size_of_val(&Holding::new(work, ())) < size + 64);
    }
}
