//! The engine: requests in, token streams out. One scheduler loop on a
//! dedicated OS thread batches everything running, step by step, over the
//! shared paged KV cache (continuous batching, as vLLM's v1 engine).
//!
//! [`EngineHandle`] is the async-facing side: cheap to clone, it checks
//! admission, sends commands over a channel and hands back a
//! [`RequestStream`]. Dropping the stream aborts the request.

mod core;
pub mod detokenizer;
pub mod grammar;
pub mod model_runner;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

pub use self::core::{EngineConfig, EngineCore, RequestId};
pub use request::{
    EngineError, EngineEvent, FinishReason, GenerateRequest, Limits, SamplingParams, SeqOutput,
    StopParams, Timings, TokenLogprob, Usage, ValidRequest, MAX_LOGPROBS, MAX_N,
};
pub use stats::{EngineStats, QueueSlot, StatsSnapshot};

use crate::kv_cache::{BlockState, KvCacheSizing};
use crate::models::{LoadedModel, ModelKind};
use crate::tokenizer::Tokenizer;

enum Command {
    Add {
        id: RequestId,
        req: Box<ValidRequest>,
        tx: UnboundedSender<EngineEvent>,
        /// Dropped with the command if the engine never takes it.
        slot: QueueSlot,
    },
    Abort(RequestId),
    /// End every request with this error (shutdown deadline).
    AbortAll(EngineError),
    /// Panic on the engine thread (tests of the supervisor).
    Panic,
    /// Forget every cached prefix.
    ResetPrefixCache,
    /// Report every KV block's state (the dashboard's block map).
    BlockMap(tokio::sync::oneshot::Sender<Vec<BlockState>>),
}

struct Shared {
    stats: Arc<EngineStats>,
    alive: AtomicBool,
    /// Cleared when the server stops taking requests (shutdown deadline).
    accepting: AtomicBool,
    next_id: AtomicU64,
    cfg: EngineConfig,
    limits: Limits,
    /// What the model computes: generation or embedding requests only.
    kind: ModelKind,
    architecture: &'static str,
}

/// Cheap-to-clone handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    /// Becomes true when the engine thread has ended, for whatever reason.
    stopped: watch::Receiver<bool>,
}

impl EngineHandle {
    /// Starts the engine thread, which owns the model from now on.
    ///
    /// The thread is supervised: if the engine panics, the panic is logged
    /// with the requests of the step it was running, the engine is marked
    /// dead at once (`/health` answers 503, new requests are refused), every
    /// request in flight ends with [`EngineError::EngineDead`], and
    /// [`EngineHandle::stopped`] resolves so that the server can exit.
    pub fn spawn(
        loaded: LoadedModel,
        sizing: KvCacheSizing,
        cfg: EngineConfig,
    ) -> anyhow::Result<Self> {
        let stats = Arc::new(EngineStats::default());
        let tokenizer = Arc::new(loaded.tokenizer.clone());
        let vocab_size = loaded.model.spec().vocab_size;
        let (kind, architecture) = (loaded.model.spec().kind, loaded.model.spec().architecture);
        let mut core = EngineCore::new(loaded.model, loaded.tokenizer, sizing, cfg, stats.clone())?;
        let shared = Arc::new(Shared {
            stats,
            alive: AtomicBool::new(true),
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            cfg,
            limits: Limits {
                vocab_size,
                max_model_len: cfg.max_model_len,
                cache_tokens: sizing.max_tokens(),
            },
            kind,
            architecture,
        });
        let (tx, rx) = mpsc::channel();
        let (stopped_tx, stopped) = watch::channel(false);
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_loop(&mut core, &rx)
                }));
                thread_shared.alive.store(false, Ordering::SeqCst);
                match outcome {
                    // Every handle is gone: whatever is still in flight learns it.
                    Ok(()) => core.fail_all(&EngineError::EngineDead),
                    Err(panic) => {
                        tracing::error!(
                            engine_ids = ?core.requests_in_step(),
                            "the engine thread panicked while running the requests with these \
                             engine ids (each HTTP request's log line names its engine_ids): {}; \
                             failing every request in flight",
                            panic_message(&*panic)
                        );
                        core.fail_all_after_panic(&EngineError::EngineDead);
                    }
                }
                // Commands still queued (and their queue slots) go with the
                // receiver; their streams then end with EngineDead.
                drop(rx);
                drop(core);
                let _ = stopped_tx.send(true);
            })?;
        Ok(Self {
            tx,
            shared,
            tokenizer,
            stopped,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The shared tokenizer, for work moved off the async threads.
    pub fn tokenizer_arc(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Has the engine thread call `f` with the tokens of every step.
    pub fn observe_steps(&self, f: impl Fn(usize) + Send + Sync + 'static) {
        self.shared.stats.observe_steps(f);
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Resolves once the engine thread has ended (it panicked, or every
    /// handle was dropped) and every request it held has been told.
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        let _ = rx.wait_for(|&s| s).await;
    }

    /// Validates a request against this engine's limits (see
    /// [`GenerateRequest::validate`]).
    pub fn validate(&self, req: GenerateRequest) -> Result<ValidRequest, EngineError> {
        let kind = self.shared.kind;
        if req.embed != kind.is_embedding() {
            let (asked, route) = if req.embed {
                (
                    "embeddings",
                    "/v1/completions, /v1/chat/completions or /v1/responses",
                )
            } else {
                ("text generation", "/v1/embeddings")
            };
            return Err(EngineError::WrongTask(format!(
                "this model ({}) serves the {} task, not {asked}: use {route}",
                self.shared.architecture,
                kind.task()
            )));
        }
        if kind.is_encoder_decoder() && req.prompt_logprobs.is_some() {
            return Err(EngineError::InvalidParam {
                param: "echo".into(),
                message: format!(
                    "this model ({}) is an encoder-decoder: its input is read by the encoder, \
                     not predicted, so it has no logprobs (echo with logprobs, prompt_logprobs)",
                    self.shared.architecture
                ),
            });
        }
        req.validate(&self.shared.limits)
    }

    /// The model's registry name (`LlamaForCausalLM`, ...).
    pub fn architecture(&self) -> &'static str {
        self.shared.architecture
    }

    /// What the model computes.
    pub fn model_kind(&self) -> ModelKind {
        self.shared.kind
    }

    /// Validates and queues one request (benchmarks, tests, tools). Errors
    /// come back at once for invalid or oversized requests and when the queue
    /// is full; otherwise events follow on the stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        let req = self.validate(req)?;
        Ok(self
            .submit_many(vec![req])?
            .pop()
            .expect("one stream per request"))
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Queues several requests (the prompts of one API call) all or none:
    /// they take their places in the queue together, so a call is never half
    /// admitted.
    pub fn submit_many(&self, reqs: Vec<ValidRequest>) -> Result<Vec<RequestStream>, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::EngineDead);
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let limit = self.shared.cfg.max_waiting_requests;
        if reqs.len() > limit {
            return Err(EngineError::InvalidParam {
                param: "prompt".into(),
                message: format!(
                    "{} prompts in one request, but at most {limit} requests may wait \
                     (--max-waiting-requests)",
                    reqs.len()
                ),
            });
        }
        let slots = self
            .shared
            .stats
            .try_enqueue_many(reqs.len(), limit)
            .map_err(|waiting| EngineError::Overloaded { waiting })?;
        let mut streams = Vec::with_capacity(reqs.len());
        for (req, slot) in reqs.into_iter().zip(slots) {
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = unbounded_channel();
            let cmd = Command::Add {
                id,
                req: Box::new(req),
                tx,
                slot,
            };
            // A failed send drops the command, its slot with it; the streams
            // already made abort their requests when dropped.
            if self.tx.send(cmd).is_err() {
                return Err(EngineError::EngineDead);
            }
            streams.push(RequestStream {
                id,
                rx,
                engine: self.tx.clone(),
                done: false,
            });
        }
        Ok(streams)
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Refuses every later request with [`EngineError::ShuttingDown`] and
    /// ends every request in flight with it (each stream gets it as its last
    /// event): the shutdown deadline has passed.
    pub fn shut_down_now(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        let _ = self.tx.send(Command::AbortAll(EngineError::ShuttingDown));
    }

    /// Forgets every cached prefix (between steps).
    pub fn reset_prefix_cache(&self) -> Result<(), EngineError> {
        self.tx
            .send(Command::ResetPrefixCache)
            .map_err(|_| EngineError::EngineDead)
    }

    /// Every KV block's state (by block id), read between two steps; `None`
    /// when the engine has stopped.
    pub async fn block_states(&self) -> Option<Vec<BlockState>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Command::BlockMap(tx)).ok()?;
        rx.await.ok()
    }

    /// Makes the engine thread panic, to test the supervisor.
    #[doc(hidden)]
    pub fn inject_panic_for_tests(&self) {
        let _ = self.tx.send(Command::Panic);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The events of one request. Dropping it before the end aborts the request
/// and frees its blocks. If the engine goes away without a last event, the
/// stream ends with [`EngineError::EngineDead`], never silently.
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
        self.note(ev)
    }

    /// Blocking variant for non-async callers (benchmarks, tests).
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        let ev = self.rx.blocking_recv();
        self.note(ev)
    }

    /// Marks the end of the stream; a channel closed before the last event
    /// means the engine died.
    fn note(&mut self, ev: Option<EngineEvent>) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        match ev {
            None => {
                self.done = true;
                Some(EngineEvent::Error(EngineError::EngineDead))
            }
            Some(ev @ (EngineEvent::Done { .. } | EngineEvent::Error(_))) => {
                self.done = true;
                Some(ev)
            }
            Some(ev) => Some(ev),
        }
    }
}

impl futures_util::Stream for RequestStream {
    type Item = EngineEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<EngineEvent>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        let ev = std::task::ready!(self.rx.poll_recv(cx));
        std::task::Poll::Ready(self.note(ev))
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
        Command::Add { id, req, tx, slot } => core.add_request(id, *req, tx, slot),
        Command::Abort(id) => core.abort(id),
        Command::AbortAll(err) => core.abort_all(&err),
        Command::Panic => panic!("panic injected by a test"),
        Command::ResetPrefixCache => core.reset_prefix_cache(),
        Command::BlockMap(tx) => {
            // The asker may have given up waiting: nothing to do then.
            let _ = tx.send(core.block_states());
        }
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
