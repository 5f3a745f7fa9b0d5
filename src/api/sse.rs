//! Server-sent events from engine streams: one loop shared by completions and
//! chat, ending with `data: [DONE]` whatever happens. Dropping the body (the
//! client went away) drops the engine streams, which aborts the requests.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, SelectAll, StreamExt};
use futures_util::Stream;

use super::error::ApiError;
use crate::engine::{EngineEvent, RequestStream};

/// Events of several requests (one per prompt), tagged with the prompt index.
pub type Merged = SelectAll<std::pin::Pin<Box<dyn Stream<Item = (usize, EngineEvent)> + Send>>>;

pub fn merge(streams: Vec<RequestStream>) -> Merged {
    stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        Box::pin(s.map(move |ev| (i, ev))) as std::pin::Pin<Box<dyn Stream<Item = _> + Send>>
    }))
}

/// Turns engine events into SSE `data:` payloads.
pub trait ChunkWriter: Send + 'static {
    /// Handles one event, pushing JSON payloads to `out`.
    fn on_event(
        &mut self,
        prompt: usize,
        ev: EngineEvent,
        out: &mut VecDeque<String>,
    ) -> Result<(), ApiError>;
    /// Every stream ended normally: final payloads (the usage chunk).
    fn on_end(&mut self, out: &mut VecDeque<String>);
}

pub fn data(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("response types serialize")
}

struct State<W> {
    events: Merged,
    writer: W,
    pending: VecDeque<String>,
    finished: bool,
}

pub fn respond<W: ChunkWriter>(events: Merged, writer: W, first: VecDeque<String>) -> Response {
    let state = State {
        events,
        writer,
        pending: first,
        finished: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(payload) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(payload)), s));
            }
            if s.finished {
                return None;
            }
            match s.events.next().await {
                Some((prompt, ev)) => {
                    if let Err(e) = s.writer.on_event(prompt, ev, &mut s.pending) {
                        s.pending.push_back(data(&e.body()));
                        s.pending.push_back("[DONE]".into());
                        s.finished = true;
                    }
                }
                None => {
                    s.writer.on_end(&mut s.pending);
                    s.pending.push_back("[DONE]".into());
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(body).into_response()
}
