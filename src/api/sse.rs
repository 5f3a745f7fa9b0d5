//! Server-sent events from engine streams: one loop shared by completions,
//! chat and responses, ending with the writer's end marker (`data: [DONE]`
//! for the first two) whatever happens. Dropping the body (the client went
//! away) drops the engine streams, which aborts the requests.

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

/// One SSE event: an optional `event:` name and its `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub event: Option<&'static str>,
    pub data: String,
}

impl Frame {
    pub fn event(name: &'static str, data: String) -> Self {
        Self {
            event: Some(name),
            data,
        }
    }
}

impl From<String> for Frame {
    fn from(data: String) -> Self {
        Self { event: None, data }
    }
}

/// Turns engine events into SSE events.
pub trait ChunkWriter: Send + 'static {
    /// Handles one event, pushing payloads to `out`.
    fn on_event(
        &mut self,
        prompt: usize,
        ev: EngineEvent,
        out: &mut VecDeque<Frame>,
    ) -> Result<(), ApiError>;
    /// Every stream ended normally: final payloads (the usage chunk).
    fn on_end(&mut self, out: &mut VecDeque<Frame>);
    /// What a failure mid-stream sends: the error object, then the end marker.
    fn error_frames(&mut self, e: &ApiError) -> Vec<Frame> {
        let mut frames = vec![Frame::from(data(&e.body()))];
        frames.extend(self.end_marker());
        frames
    }
    /// The last event of every stream.
    fn end_marker(&self) -> Option<Frame> {
        Some(Frame::from("[DONE]".to_string()))
    }
}

pub fn data(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("response types serialize")
}

struct State<W> {
    events: Merged,
    writer: W,
    pending: VecDeque<Frame>,
    finished: bool,
}

pub fn respond<W: ChunkWriter>(
    events: Merged,
    writer: W,
    first: impl IntoIterator<Item = impl Into<Frame>>,
) -> Response {
    let first: VecDeque<Frame> = first.into_iter().map(Into::into).collect();
    let state = State {
        events,
        writer,
        pending: first,
        finished: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(frame) = s.pending.pop_front() {
                let mut event = Event::default().data(frame.data);
                if let Some(name) = frame.event {
                    event = event.event(name);
                }
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.finished {
                return None;
            }
            match s.events.next().await {
                Some((prompt, ev)) => {
                    if let Err(e) = s.writer.on_event(prompt, ev, &mut s.pending) {
                        let frames = s.writer.error_frames(&e);
                        s.pending.extend(frames);
                        s.finished = true;
                    }
                }
                None => {
                    s.writer.on_end(&mut s.pending);
                    s.pending.extend(s.writer.end_marker());
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;

    struct Echo;

    impl ChunkWriter for Echo {
        fn on_event(
            &mut self,
            _: usize,
            ev: EngineEvent,
            out: &mut VecDeque<Frame>,
        ) -> Result<(), ApiError> {
            match ev {
                EngineEvent::Error(e) => Err(e.into()),
                _ => {
                    out.push_back("{\"ok\":true}".to_string().into());
                    Ok(())
                }
            }
        }

        fn on_end(&mut self, out: &mut VecDeque<Frame>) {
            out.push_back("{\"end\":true}".to_string().into());
        }
    }

    async fn body_of(events: Vec<EngineEvent>) -> String {
        let s: Merged =
            stream::select_all(vec![
                Box::pin(stream::iter(events.into_iter().map(|e| (0usize, e))))
                    as std::pin::Pin<Box<dyn Stream<Item = _> + Send>>,
            ]);
        let resp = respond(s, Echo, ["{\"first\":true}".to_string()]);
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn an_error_mid_stream_is_an_event_then_done() {
        let body = body_of(vec![
            EngineEvent::PromptLogprobs(Vec::new()),
            EngineEvent::Error(EngineError::Internal("boom".into())),
        ])
        .await;
        let events: Vec<&str> = body.split_terminator("\n\n").collect();
        assert_eq!(events[0], "data: {\"first\":true}");
        assert_eq!(events[1], "data: {\"ok\":true}");
        assert!(
            events[2].starts_with("data: {\"error\":") && events[2].contains("boom"),
            "{body}"
        );
        assert_eq!(events[3], "data: [DONE]");
        assert_eq!(events.len(), 4);
    }

    #[tokio::test]
    async fn a_normal_end_runs_the_writer_then_done() {
        let body = body_of(vec![EngineEvent::PromptLogprobs(Vec::new())]).await;
        assert!(
            body.ends_with("data: {\"end\":true}\n\ndata: [DONE]\n\n"),
            "{body}"
        );
    }
}
