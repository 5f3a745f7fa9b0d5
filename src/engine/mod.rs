//! The engine: requests in, token streams out. One scheduler loop on a
//! dedicated OS thread batches everything running, step by step, over the
//! shared paged KV cache (continuous batching, as vLLM's v1 engine).
//!
//! [`EngineHandle`] is the async-facing side: cheap to clone, it checks
//! admission, sends commands over a channel and hands back a
//! [`RequestStream`]. Dropping the stream aborts the request.

mod core;
pub mod detokenizer;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use self::core::{EngineConfig, EngineCore, RequestId};
pub use request::{
    EngineError, EngineEvent, FinishReason, GenerateRequest, SamplingParams, SeqOutput, StopParams,
    Timings, TokenLogprob, Usage, MAX_LOGPROBS, MAX_N,
};
pub use stats::{EngineStats, StatsSnapshot};

use crate::kv_cache::KvCacheSizing;
use crate::model::LoadedModel;
use crate::tokenizer::Tokenizer;

enum Command {
    Add {
        id: RequestId,
        req: Box<GenerateRequest>,
        tx: UnboundedSender<EngineEvent>,
        arrived: Instant,
    },
    Abort(RequestId),
}

struct Shared {
    stats: Arc<EngineStats>,
    alive: AtomicBool,
    next_id: AtomicU64,
    cfg: EngineConfig,
    /// Tokens the whole KV pool holds.
    cache_tokens: usize,
    vocab_size: usize,
}

/// Cheap-to-clone handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
}

impl EngineHandle {
    /// Starts the engine thread, which owns the model from now on.
    pub fn spawn(
        loaded: LoadedModel,
        sizing: KvCacheSizing,
        cfg: EngineConfig,
    ) -> anyhow::Result<Self> {
        let stats = Arc::new(EngineStats::default());
        let tokenizer = Arc::new(loaded.tokenizer.clone());
        let vocab_size = loaded.model.vocab_size();
        let mut core = EngineCore::new(loaded.model, loaded.tokenizer, sizing, cfg, stats.clone())?;
        let shared = Arc::new(Shared {
            stats,
            alive: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            cfg,
            cache_tokens: sizing.max_tokens(),
            vocab_size,
        });
        let (tx, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || {
                run_loop(&mut core, &rx);
                thread_shared.alive.store(false, Ordering::SeqCst);
                // Whatever is still in flight learns the engine is gone.
                core.fail_all(&EngineError::EngineDead);
            })?;
        Ok(Self {
            tx,
            shared,
            tokenizer,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Checks a request against the engine's limits; the same checks
    /// [`EngineHandle::submit`] makes, without queueing anything.
    pub fn check(&self, req: &GenerateRequest) -> Result<(), EngineError> {
        req.check()?;
        if let Some(&bad) = req
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= self.shared.vocab_size)
        {
            return Err(EngineError::InvalidParam {
                param: "prompt".into(),
                message: format!(
                    "token id {bad} is out of vocabulary (size {})",
                    self.shared.vocab_size
                ),
            });
        }
        let max_len = self.shared.cfg.max_model_len;
        let requested = req.prompt_ids.len() + req.stop.max_tokens;
        if requested > max_len {
            return Err(EngineError::ContextLength {
                max_model_len: max_len,
                requested,
                prompt: req.prompt_ids.len(),
                max_tokens: req.stop.max_tokens,
            });
        }
        if requested > self.shared.cache_tokens {
            return Err(EngineError::TooLargeForCache {
                needed: requested,
                capacity: self.shared.cache_tokens,
            });
        }
        Ok(())
    }

    /// Queues a request. Errors come back at once for invalid or oversized
    /// requests and when the queue is full; otherwise events follow on the stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::EngineDead);
        }
        self.check(&req)?;
        self.shared
            .stats
            .try_enqueue(self.shared.cfg.max_waiting_requests)
            .map_err(|waiting| EngineError::Overloaded { waiting })?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let cmd = Command::Add {
            id,
            req: Box::new(req),
            tx,
            arrived: Instant::now(),
        };
        if self.tx.send(cmd).is_err() {
            return Err(EngineError::EngineDead);
        }
        Ok(RequestStream {
            id,
            rx,
            engine: self.tx.clone(),
            done: false,
        })
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }
}

/// The events of one request. Dropping it before the end aborts the request
/// and frees its blocks.
pub struct RequestStream {
    id: RequestId,
    rx: UnboundedReceiver<EngineEvent>,
    engine: mpsc::Sender<Command>,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; `None` after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        let ev = self.rx.recv().await;
        self.note(ev.as_ref());
        ev
    }

    /// Blocking variant for non-async callers (benchmarks, tests).
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        let ev = self.rx.blocking_recv();
        self.note(ev.as_ref());
        ev
    }

    fn note(&mut self, ev: Option<&EngineEvent>) {
        if matches!(
            ev,
            None | Some(EngineEvent::Done { .. }) | Some(EngineEvent::Error(_))
        ) {
            self.done = true;
        }
    }
}

impl futures_util::Stream for RequestStream {
    type Item = EngineEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<EngineEvent>> {
        let poll = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(ev) = &poll {
            self.note(ev.as_ref());
        }
        poll
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.engine.send(Command::Abort(self.id));
        }
    }
}

fn apply(core: &mut EngineCore, cmd: Command) {
    match cmd {
        Command::Add {
            id,
            req,
            tx,
            arrived,
        } => core.add_request(id, *req, tx, arrived),
        Command::Abort(id) => core.abort(id),
    }
}

/// Blocks on the channel while idle (no CPU), steps while there is work.
fn run_loop(core: &mut EngineCore, rx: &mpsc::Receiver<Command>) {
    loop {
        if !core.has_work() {
            match rx.recv() {
                Ok(cmd) => apply(core, cmd),
                Err(_) => return, // every handle is gone
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => apply(core, cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !core.has_work() {
                        return;
                    }
                    break;
                }
            }
        }
        core.drop_disconnected();
        match core.step() {
            Ok(true) => {}
            // Requests exist but none can run now: wait for a command instead
            // of spinning (a safety net; admission makes this unreachable).
            Ok(false) => {
                if let Ok(cmd) = rx.recv_timeout(std::time::Duration::from_millis(5)) {
                    apply(core, cmd);
                }
            }
            Err(e) => {
                tracing::error!("engine step failed: {e:#}");
                core.fail_all(&EngineError::Internal(format!("{e:#}")));
            }
        }
    }
}
