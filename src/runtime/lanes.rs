//! Lanes: single-threaded runtimes, one per core, on which a tunnel and every stream it
//! carries run together.
//!
//! On tokio's work-stealing runtime a tunnel's connection task and its streams' tasks wake
//! each other across threads at every frame (a futex wake and a context switch each time),
//! and idle workers are woken to steal work that was about to run anyway. Per small
//! request that was about a third of the CPU the proxy and the agent spent
//! (docs/benchmarks.md). On a lane, a tunnel's work stays on one thread and its wake-ups
//! are local; tunnels are spread over the lanes, so the cores are still all used once there
//! are several. On the proxy, every lane also accepts from each public listener and routes
//! what it accepted: a client whose tunnel runs on the lane that took it never changes
//! thread. QUIC tunnels run on lanes too: the QUIC port is a socket per lane, each read
//! by an endpoint on its lane, the kernel steering each packet to the socket its
//! connection ID names (`tunnel/quic/steer.rs`); quinn runs a connection where its
//! endpoint accepted it. What is no tunnel's (the agent port's TCP accept, enrollment,
//! the admin listener, the store) stays on the main runtime.
//!
//! A socket moves to a lane by leaving the runtime it was registered with and joining the
//! lane's ([`Picked::run_with`]). Work on a lane is cancelled when the future that waits
//! for it is dropped, so the callers' accounting (connection permits, grace periods) holds
//! as before. A process has one set of lanes ([`Lanes::shared`]), started when first
//! asked for, whose threads last as long as the process: a proxy and agents built over
//! and over in one process (tests, embedders) share them rather than start threads each.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;

/// A set of lanes (clones share them).
#[derive(Clone)]
pub(crate) struct Lanes {
    lanes: Arc<[Lane]>,
    /// Where the next search for the least loaded lane starts: ties go round robin.
    next: Arc<AtomicUsize>,
}

/// One lane: a handle to its runtime, and how much it carries.
#[derive(Clone)]
pub(crate) struct Lane {
    handle: tokio::runtime::Handle,
    /// Units of work on this lane now (tunnels, the clients routed to them from the moment
    /// they are, agent sessions): new tunnels go to the least loaded lane.
    load: Arc<AtomicUsize>,
}

thread_local! {
    /// The lane this thread runs, if it is a lane's thread.
    static CURRENT: RefCell<Option<Lane>> = const { RefCell::new(None) };
}

impl Lanes {
    /// Starts `count` lanes (at least one), their threads named `name-N`; they run until
    /// the process ends.
    pub(crate) fn start(count: usize, name: &str) -> std::io::Result<Lanes> {
        let mut lanes = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let lane = Lane {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
            };
            let this = lane.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| *c.borrow_mut() = Some(this));
                    runtime.block_on(std::future::pending::<()>())
                })?;
            lanes.push(lane);
        }
        Ok(Lanes {
            lanes: lanes.into(),
            next: Arc::default(),
        })
    }

    /// This process's lanes, one per core it may use; started at the first call.
    pub(crate) fn shared() -> std::io::Result<Lanes> {
        static SHARED: std::sync::Mutex<Option<Lanes>> = std::sync::Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lanes) = &*shared {
            return Ok(lanes.clone());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let lanes = Lanes::start(cores, "revproxy-lane")?;
        *shared = Some(lanes.clone());
        Ok(lanes)
    }

    /// Every lane.
    pub(crate) fn all(&self) -> &[Lane] {
        &self.lanes
    }

    /// The least loaded lane (ties round robin), counted as carrying one more unit of
    /// work from now on: several picks at once spread out.
    pub(crate) fn pick(&self) -> Picked {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.lanes.len();
        let lane = (0..count)
            .map(|i| &self.lanes[(start + i) % count])
            .min_by_key(|lane| lane.load.load(Ordering::Relaxed))
            .expect("at least one lane");
        lane.take()
    }
}

/// A lane with one unit of work counted on it, for [`Picked::run`] or
/// [`Picked::run_with`].
pub(crate) struct Picked {
    lane: Lane,
    load: Load,
}

impl Lane {
    /// Where the caller runs: the lane whose thread this is, or else the current runtime
    /// (the main one) as a lane of its own, with a load no pick looks at. Work for a tunnel
    /// goes where the tunnel runs, lane or not.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub(crate) fn here() -> Lane {
        CURRENT
            .with(|c| c.borrow().clone())
            .unwrap_or_else(|| Lane {
                handle: tokio::runtime::Handle::current(),
                load: Arc::default(),
            })
    }

    /// Makes this lane's runtime the current one on this thread until the guard drops:
    /// what is spawned or registered meanwhile (a QUIC endpoint's socket and driver) is
    /// the lane's.
    pub(crate) fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }

    /// Whether the caller runs on this lane's runtime.
    pub(crate) fn is_current(&self) -> bool {
        tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == self.handle.id())
    }

    /// This lane, with one more unit of work counted on it.
    pub(crate) fn take(&self) -> Picked {
        Picked {
            lane: self.clone(),
            load: Load::on(self),
        }
    }
}

/// Work handed to a lane, as its caller waits for it: a pointer, whatever the size of the
/// work. Async functions keep their arguments in their own state, and a caller's state
/// holds the futures it awaits, so a connection's whole handling (tens of KiB of state)
/// passed down by value would be held once more by every task that waits for it.
pub(crate) type Waiting<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Picked {
    /// Runs `work` on the lane, counted in its load until it ends; the current tracing
    /// span goes with it. Dropping the returned future cancels the work. A panic in it is
    /// carried on to the caller. Called on the lane itself, it runs `work` in place (when
    /// awaited); else it is spawned there at once.
    pub(crate) fn run<T: Send + 'static>(
        self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Waiting<T> {
        let Picked { lane, load } = self;
        let work = super::holding::Holding::new(work, load);
        if lane.is_current() {
            Box::pin(work)
        } else {
            Box::pin(lane.run(work))
        }
    }

    /// Runs `work` on the lane with `tcp` moved there (registered with the lane's runtime
    /// instead of the current one), as [`Picked::run`] does. An error is the move's. Called
    /// on the lane itself, nothing moves.
    pub(crate) fn run_with<T, F, Fut>(self, tcp: TcpStream, work: F) -> Waiting<std::io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        if self.lane.is_current() {
            return self.run(async move { Ok(work(tcp).await) });
        }
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        self.run(async move {
            let tcp = TcpStream::from_std(std)?;
            Ok(work(tcp).await)
        })
    }
}

impl Lane {
    /// Spawns `work` on this lane at once, without counting it in the lane's load (work
    /// that every lane carries alike, such as accepting), and returns what waits for it,
    /// as [`Picked::run`] does otherwise.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> impl Future<Output = T> + Send + 'static {
        let span = tracing::Span::current();
        let task =
            AbortOnDropHandle::new(self.handle.spawn(with_subscriber(work.instrument(span))));
        async move {
            match task.await {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Only the lane's runtime shutting down cancels it: the process is stopping.
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// `work` with the caller's tracing subscriber: a scoped subscriber (a test's log capture)
/// belongs to the thread that set it, and work moved to a lane, or spawned there, would
/// log elsewhere. Setting it costs a few atomic operations per poll; the lanes' figures in
/// docs/benchmarks.md were measured with it.
pub(crate) fn with_subscriber<T>(
    work: impl Future<Output = T> + Send + 'static,
) -> impl Future<Output = T> + Send + 'static {
    work.with_current_subscriber()
}

/// Spawns `work` on the current runtime, with the caller's subscriber (see
/// [`with_subscriber`]).
pub(crate) fn spawn<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> JoinHandle<T> {
    tokio::spawn(with_subscriber(work))
}

/// One unit of a lane's load, given back when dropped.
struct Load(Arc<AtomicUsize>);

impl Load {
    fn on(lane: &Lane) -> Load {
        lane.load.fetch_add(1, Ordering::Relaxed);
        Load(lane.load.clone())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socket_moves_to_a_lane_and_work_there_is_cancelled_with_its_caller() {
        let lanes = Lanes::start(2, "test-lane").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();

        // Moved to a lane, the socket echoes from there.
        let picked = lanes.pick();
        assert!(!picked.lane.is_current());
        let echo = tokio::spawn(picked.run_with(server, |mut tcp| async move {
            let on_lane = CURRENT.with(|c| c.borrow().is_some());
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await.unwrap();
            tcp.write_all(&buf).await.unwrap();
            (on_lane, tcp)
        }));
        client.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        let (on_lane, server) = echo.await.unwrap().unwrap();
        assert!(on_lane, "the work ran on a lane's thread");
        let loads = || -> Vec<usize> {
            lanes
                .lanes
                .iter()
                .map(|l| l.load.load(Ordering::Relaxed))
                .collect()
        };
        settle(|| loads() == [0, 0]).await;

        // Picks count at once, so picks made together spread over the lanes.
        let (first, second) = (lanes.pick(), lanes.pick());
        assert_eq!(loads(), [1, 1]);
        drop(second);
        assert_eq!(loads().iter().sum::<usize>(), 1);

        // Dropping the caller of work in progress cancels it: the socket it held closes,
        // which the client sees, and its lane's load is given back.
        let waiting = tokio::spawn(first.run_with(server, |mut tcp| async move {
            let mut buf = [0u8; 1];
            let _ = tcp.read(&mut buf).await;
        }));
        waiting.abort();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut back))
            .await
            .expect("the cancelled work's socket closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        settle(|| loads() == [0, 0]).await;
    }

    /// Until `cond` holds (another thread makes it so), within five seconds.
    async fn settle(cond: impl Fn() -> bool) {
        let within = std::time::Duration::from_secs(5);
        tokio::time::timeout(within, async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("settled");
    }
}
